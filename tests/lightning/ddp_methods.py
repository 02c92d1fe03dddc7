"""Trains every method on digits, on one process or with DDP on two CPU processes; writes the test metrics as JSON.

    python ddp_methods.py <out.json> single|ddp

Run by tests/lightning/test_ddp.py (Lightning's DDP launcher starts this script again for the second process).
"""

import json
import os
import sys

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bdl
from bdl.lightning import (
    MLP,
    DeterministicModule,
    DigitsDataModule,
    EnsembleModule,
    MCDropoutModule,
    SVIModule,
    VariationalModule,
)

EPOCHS = 2


def build(method: str) -> L.LightningModule:
    net = MLP(64, 8, hidden=[32], dropout=0.1 if method == "mc_dropout" else 0.0)
    options = dict(lr=1e-2, num_val_samples=4, save_report=False)
    if method == "deterministic":
        return DeterministicModule(net, **options)
    if method == "variational":
        return VariationalModule(net, num_eval_samples=16, **options)
    if method == "mc_dropout":
        return MCDropoutModule(net, num_eval_samples=16, **options)
    if method == "ensemble":
        return EnsembleModule(net, num_members=3, lr=1e-2, save_report=False)
    return SVIModule(bdl.infer.PyroModel(net, "categorical"), lr=1e-2, num_eval_samples=16, num_val_samples=4, save_report=False)


def main(out: str, mode: str) -> None:
    torch.set_num_threads(1)
    processes = 2 if mode == "ddp" else 1
    results = {}
    for method in ("deterministic", "variational", "mc_dropout", "ensemble", "svi"):
        L.seed_everything(0)
        data = DigitsDataModule(batch_size=64 // processes)  # the same global batch
        module = build(method)
        trainer = L.Trainer(
            max_epochs=EPOCHS, accelerator="cpu", devices=processes, strategy="ddp" if processes > 1 else "auto",
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(module, data)
        logged_val_accuracy = float(trainer.callback_metrics["val/accuracy"])
        train_means = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/") and k.endswith("_epoch")}
        every_process = [train_means] * processes
        if processes > 1:
            torch.distributed.all_gather_object(every_process, train_means)
        trainer.test(module, data, verbose=False)
        if trainer.is_global_zero:
            entry = {"test": module.report.metrics, "num_test": len(module.report.prediction), "val_accuracy": logged_val_accuracy,
                     "targets": module.report.targets.tolist()}  # fmt: skip
            if method == "deterministic":  # one forward per input: the synced metric must equal the full-set value
                x, y = data.splits.val.tensors
                with torch.no_grad():
                    entry["val_accuracy_full_set"] = float((module.model(x).argmax(1) == y).float().mean())
            if method == "variational":
                entry["num_data"] = module.num_data
            entry["train_epoch_means"] = every_process
            results[method] = entry
    if processes > 1:  # a non-finite loss on one process stops both (the other waited in its next collective)
        L.seed_everything(0)
        trainer = L.Trainer(
            max_steps=3, accelerator="cpu", devices=processes, strategy="ddp", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        )  # fmt: skip
        try:
            trainer.fit(NaNOnTheLastProcess(MLP(64, 8, hidden=[16]), save_report=False), DigitsDataModule(batch_size=32))
            results["nan_on_one_process"] = "no error"
        except FloatingPointError as error:
            results["nan_on_one_process"] = str(error)
    if processes > 1:  # one validation row for two processes: the process holding only the sampler's repeat hung the other
        L.seed_everything(0)
        x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
        val = TensorDataset(x[:1], y[:1])
        trainer = L.Trainer(
            max_epochs=2, accelerator="cpu", devices=processes, strategy="ddp", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        module = OwnEpochHooks(MLP(4, 2, hidden=[8]), save_report=False)
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(val, batch_size=4))
        with torch.no_grad():
            correct = float(module.model(val.tensors[0]).argmax(1).eq(val.tensors[1]).float().mean())
        results["one_validation_row"] = {"logged": float(trainer.callback_metrics["val/accuracy"]), "correct": correct}
        # a regressor whose predictions have no variance updates no NLL anywhere: the process holding only the repeat
        # logged one, and the other waited in its synchronisation
        L.seed_everything(0)
        x, y = torch.randn(16, 3), torch.randn(16, 1)
        trainer = L.Trainer(
            max_epochs=1, accelerator="cpu", devices=processes, strategy="ddp", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        )  # fmt: skip
        module = MeanOnly(MLP(3, 1, hidden=[8]), task="regression", save_report=False)
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4), DataLoader(TensorDataset(x[:3], y[:3]), batch_size=1))
        results["no_variance_logged"] = sorted(key for key in trainer.callback_metrics if key.startswith("val/"))
        # a buffered metric that only process 0 updates: the other synced a float32 placeholder, and gloo aborted the
        # job (SIGABRT) where process 0 had stored float64, float16 or integer values
        results["buffered_on_one_process"] = {
            name: float(metric_on_process_0(name, trainer.global_rank)) for name in BUFFERED_ON_ONE_PROCESS
        }
    if processes > 1:
        results["random_sampler"] = random_sampler_outcomes(torch.distributed.get_rank())
        results["uneven_batches"] = uneven_batch_outcomes()
        results["synced_on_step"] = synced_on_step(torch.distributed.get_rank())
    if trainer.global_rank == 0:
        with open(out, "w") as file:
            json.dump(results, file)
    if torch.distributed.is_initialized():  # left alive, gloo's threads aborted the process at exit (status -6), now and then
        torch.distributed.destroy_process_group()


def random_sampler_outcomes(rank: int) -> dict[str, object]:
    """Test, validate and predict on a loader with a SubsetRandomSampler of its own, which every process lists
    itself: unseeded (each its own order: the rows were split as if the orders were one, some counted twice, others
    dropped, silently), then seeded alike (every row once)."""
    from torch.utils.data import SubsetRandomSampler

    from bdl.lightning.cli import PredictionWriter

    L.seed_everything(0)
    x, y = torch.randn(21, 4), torch.arange(21)  # a class per row: the report's targets name its rows
    module = DeterministicModule(MLP(4, 21, hidden=[8]), save_report=False)
    outcomes: dict[str, object] = {}
    for seeded in (False, True):
        for stage in ("test", "validate", "predict"):
            trainer = L.Trainer(
                accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, callbacks=[PredictionWriter()],
            )  # fmt: skip
            # the sampler draws from the global generator, which Lightning reseeds from seed_everything's seed (if
            # any) as each run starts on every process
            if seeded:
                L.seed_everything(0)
            else:
                os.environ.pop("PL_GLOBAL_SEED", None)
                torch.manual_seed(100 + rank)
            loader = DataLoader(TensorDataset(x, y), batch_size=4, sampler=SubsetRandomSampler(range(21)))
            key = f"{stage}_{'seeded' if seeded else 'unseeded'}"
            try:
                getattr(trainer, stage)(module, loader, verbose=False) if stage != "predict" else trainer.predict(module, loader)
                outcomes[key] = "ok"
            except ValueError as error:
                outcomes[key] = str(error)
        outcomes["test_rows_seeded"] = sorted(module.report.targets.tolist()) if seeded else None
    return outcomes


class RankRows(torch.utils.data.Sampler):
    """Rows 0-2 on process 0 and row 3 on process 1: a sampler of the loader's own that splits unevenly."""

    def _rows(self) -> list[int]:
        return [0, 1, 2] if torch.distributed.get_rank() == 0 else [3]

    def __iter__(self):
        return iter(self._rows())

    def __len__(self) -> int:
        return len(self._rows())


class NaNOnProcess1(DeterministicModule):
    """Predicts NaN on process 1 in validation after the sanity check, and in test."""

    def sample_prediction(self, x: torch.Tensor, num_samples: int) -> bdl.Prediction:
        if self.global_rank == 1 and not self.trainer.sanity_checking and not self.training:
            x = x * float("nan")
        return super().sample_prediction(x, num_samples)


def uneven_batch_outcomes() -> dict[str, object]:
    """Validate on 3 batches on process 0 and 1 on process 1 (one row a batch): bdl's collective in every batch
    hung; a NaN prediction on process 1 stops both; testing such a loader is refused on both."""
    L.seed_everything(0)
    x, y = torch.randn(16, 4), torch.zeros(16, dtype=torch.int64)  # class 0 learned: process 1's row is wrong
    val_y = torch.tensor([0, 0, 0, 1])
    val = DataLoader(TensorDataset(x[:4], val_y), batch_size=1, sampler=RankRows())
    # a sampler of the loader's own that Lightning wraps: the check of its order, in each process's first batch, is a
    # collective, which a process whose batch failed before it skipped
    wrapped = DataLoader(TensorDataset(x[:4], val_y), batch_size=1, sampler=torch.utils.data.SubsetRandomSampler(range(4)))
    outcomes: dict[str, object] = {}
    for name, kind, loader in (("fit", DeterministicModule, val), ("nan", NaNOnProcess1, val), ("nan_wrapped", NaNOnProcess1, wrapped)):
        L.seed_everything(0)  # one order of the random sampler on both processes
        trainer = L.Trainer(
            max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=loader is wrapped,
        )  # fmt: skip
        module = kind(MLP(4, 2, hidden=[8]), lr=0.1, save_report=False)
        try:
            trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8), loader)
            with torch.no_grad():
                right = module.model(x[:4]).argmax(1).eq(val_y).float()
            outcomes[name] = {"logged": float(trainer.callback_metrics["val/accuracy"]), "correct": right.tolist()}
        except FloatingPointError as error:
            outcomes[name] = str(error)
        if loader is wrapped:
            continue
        try:
            trainer.test(module, val, verbose=False)
            outcomes[f"{name}_test"] = "ok"
        except (FloatingPointError, ValueError) as error:
            outcomes[f"{name}_test"] = f"{type(error).__name__}: {error}"
    return outcomes


BUFFERED_ON_ONE_PROCESS = ("ood_auroc_float64", "adaptive_ece_float64", "aurc_float16", "aurc_int64")


def metric_on_process_0(name: str, rank: int) -> torch.Tensor:
    """One of BUFFERED_ON_ONE_PROCESS, updated on process 0 only, computed on every process."""
    scores = torch.tensor([0.1, 0.9, 0.4, 0.7, 0.35], dtype=torch.float64)
    metric, args = {
        "ood_auroc_float64": (bdl.metrics.OODAUROC(), (scores, torch.tensor([0, 1, 0, 1, 1]).bool())),
        "adaptive_ece_float64": (bdl.metrics.AdaptiveECE(n_bins=2), (torch.stack([scores, 1 - scores], 1), torch.tensor([0, 1, 1, 0, 0]))),
        "aurc_float16": (bdl.metrics.AURC(), (scores.half(), torch.tensor([0, 1, 1, 0, 1]).half())),
        "aurc_int64": (bdl.metrics.AURC(), (torch.tensor([3, 1, 2, 5, 4]), torch.tensor([0, 1, 1, 0, 1]))),
    }[name]
    if rank == 0:
        metric.update(*args)
    return metric.compute()


def synced_on_step(rank: int) -> dict[str, float]:
    """``forward`` of metrics with ``dist_sync_on_step=True``, each process with its half of SYNCED_ON_STEP's batch
    (process 1's NLL batch empty): the OOD metrics returned each process's own batch value."""
    scores, is_ood, probs, labels = SYNCED_ON_STEP
    mine = slice(0, 3) if rank == 0 else slice(3, 8)
    nll_rows = slice(0, 8) if rank == 0 else slice(0, 0)
    nll = bdl.metrics.NLL(dist_sync_on_step=True)
    outcomes = {
        "auroc": float(bdl.metrics.OODAUROC(dist_sync_on_step=True)(scores[mine], is_ood[mine])),
        "nll": float(nll(probs[nll_rows], labels[nll_rows])),
        # told the run is not distributed: its own batch's value (it gathered, and hung where one process called it)
        "auroc_not_distributed": float(
            bdl.metrics.OODAUROC(dist_sync_on_step=True, distributed_available_fn=lambda: False)(scores[mine], is_ood[mine])
        ),
    }
    # empty on every process: NaN, and the state is kept (it raised, lost the state, and every later call failed)
    outcomes["nll_all_empty"] = float(nll(probs[:0], labels[:0]))
    outcomes["nll_after"] = float(nll.compute())
    return outcomes


SYNCED_ON_STEP = (
    torch.tensor([0.1, 0.9, 0.4, 0.7, 0.35, 0.2, 0.8, 0.5], dtype=torch.float64),
    torch.tensor([0, 1, 0, 0, 1, 1, 1, 0]).bool(),  # process 0's three are two in and one out
    torch.softmax(torch.arange(16.0).view(8, 2).sin(), 1),
    torch.tensor([0, 1, 1, 0, 1, 0, 0, 1]),
)


class OwnEpochHooks(DeterministicModule):
    """Overrides the validation epoch hooks without calling super, as Lightning users do."""

    def on_validation_epoch_start(self) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        pass


class MeanOnly(DeterministicModule):
    def sample_prediction(self, x: torch.Tensor, num_samples: int) -> bdl.Prediction:
        return bdl.predict(self.model, x, num_samples=1, task="regression")  # variance 0: no NLL


class NaNOnTheLastProcess(DeterministicModule):
    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = super().training_loss(x, y)
        if self.global_step == 1 and self.global_rank == self.trainer.world_size - 1:
            terms["loss"] = terms["loss"] * float("nan")
        return terms


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
