"""Command-line arguments the Lightning tests share."""

# One epoch of two training batches and one validation/test batch, without progress bar or model summary.
FEW_STEPS = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
    "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip
