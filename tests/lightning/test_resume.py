"""A run killed mid-epoch resumes from its last checkpoint and ends exactly where an uninterrupted run ends."""

import csv
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from bdl.lightning.cli import check_checkpoint, main

KILLER = '''
import os, signal
import lightning as L


class KillAtStep(L.Callback):
    """Kills its own process with SIGKILL (no clean-up, like an OOM kill) before the given training step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''

MODELS = {
    "variational": """
  class_path: bdl.lightning.VariationalModule
  init_args:
    model: {class_path: bdl.lightning.MLP, init_args: {in_features: 64, out_features: 8, hidden: [32]}}
    kl_warmup_epochs: 2
    lr: 0.01
    num_eval_samples: 8
""",
}


def write_config(folder: Path, method: str, kill_at: int = -1) -> Path:
    callbacks = f"""
  callbacks:
    - class_path: killer.KillAtStep
      init_args: {{step: {kill_at}}}""" if kill_at >= 0 else ""
    text = f"""seed_everything: 0
evaluate_after_fit: true
run_name: resume
model:{MODELS[method]}
data:
  class_path: bdl.lightning.DigitsDataModule
  init_args: {{batch_size: 64}}
trainer:
  max_epochs: 2
  limit_train_batches: 5
  accelerator: cpu
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {folder}{callbacks}
"""
    path = folder / f"{method}{'_killed' if kill_at >= 0 else ''}.yaml"
    path.write_text(text)
    return path


def final_metrics(root: Path) -> dict:
    return json.loads((root / "resume" / "version_0" / "metrics.json").read_text())["metrics"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["variational"])  # every module's random state: the next test, in process
def test_killed_run_resumes_from_last_checkpoint_to_the_same_final_metrics(method, tmp_path, monkeypatch, one_thread):
    # One intra-op thread in every process: float sums (and bdl's threaded noise) depend on the thread count.
    monkeypatch.setattr(sys, "argv", ["bdl"])
    (tmp_path / "killer.py").write_text(KILLER)
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    main(["fit", "--config", str(write_config(uninterrupted.mkdir() or uninterrupted, method))])

    # Killed mid-way through the second epoch (steps 0-4 are epoch 0, 5-9 epoch 1): last.ckpt is epoch 0's.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    interrupted.mkdir()
    killed = subprocess.run(
        [sys.executable, "-m", "bdl.lightning.cli", "fit", "--config", str(write_config(interrupted, method, kill_at=7))],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    folder = interrupted / "resume" / "version_0"
    assert not (folder / "metrics.json").exists()
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", "--config", str(write_config(interrupted, method)), "--ckpt_path", "last"])
    # Lightning's "Previous log files in this directory will be deleted" (bdl keeps them, below) and "Checkpoint
    # directory ... exists and is not empty" (the run's own checkpoints, resumed in place)
    assert not [str(w.message) for w in caught if "exists and is not empty" in str(w.message)]
    assert sorted(path.name for path in (interrupted / "resume").iterdir()) == ["version_0"]  # resumed in place
    resumed, reference = final_metrics(interrupted), final_metrics(uninterrupted)
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        assert resumed[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    # the training curve too: epoch 0's rows kept (Lightning's CSV logger deleted them on resume), epoch 1's once
    resumed_rows, reference_rows = csv_rows(interrupted), csv_rows(uninterrupted)
    assert [(row["epoch"], row["step"]) for row in resumed_rows] == [(row["epoch"], row["step"]) for row in reference_rows]
    assert {"0", "1"} <= {row["epoch"] for row in resumed_rows}
    for resumed_row, reference_row in zip(resumed_rows, reference_rows):
        for key, value in reference_row.items():
            if value:
                assert float(resumed_row[key]) == pytest.approx(float(value), rel=1e-5, abs=1e-6), key


def csv_rows(root: Path) -> list[dict]:
    with (root / "resume" / "version_0" / "metrics.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def test_resume_without_a_previous_run_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bdl"])
    with pytest.raises(FileNotFoundError, match="no .*version_\\*/checkpoints/last.ckpt to resume from"):
        main(["fit", "--config", str(write_config(tmp_path, "variational")), "--ckpt_path", "last"])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickled code", "not lightning", "torch.save of a state dict"])
def test_damaged_checkpoints_give_a_clear_error(damage, tmp_path):
    path = tmp_path / "model.ckpt"
    if damage == "truncated":
        torch.save({"state_dict": {"w": torch.randn(100, 100)}}, path)
        path.write_bytes(path.read_bytes()[:2000])
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "pickled code":
        torch.save({"state_dict": {}, "hook": Path("/")}, path)  # an arbitrary object: refused by weights_only
    elif damage == "not lightning":
        torch.save({"weights": torch.zeros(2)}, path)
    else:  # Lightning's KeyError 'pytorch-lightning_version', a bare traceback
        torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 2}, path)
    message = {"not lightning": "no 'state_dict'", "torch.save of a state dict": "has a 'state_dict' but no 'pytorch-lightning_version'"}
    message = message.get(damage, "cannot be loaded safely")
    with pytest.raises(ValueError, match=message):
        check_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_checkpoint(tmp_path / "missing.ckpt")


def test_the_bdl_command_reports_a_damaged_checkpoint_in_one_line(tmp_path, monkeypatch, capsys):
    from bdl.lightning.cli import console

    path = tmp_path / "broken.ckpt"
    path.write_bytes(os.urandom(1000))
    config = write_config(tmp_path, "variational")
    monkeypatch.setattr(sys, "argv", ["bdl", "test", "--config", str(config), "--ckpt_path", str(path)])
    with pytest.raises(SystemExit) as exit_info:
        console()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"bdl: error: checkpoint '{path}' cannot be loaded safely")
    assert not (tmp_path / "resume").exists()  # nothing half-written


def _resume_case(method: str, seed: int):
    import lightning as L
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import bdl
    from bdl.infer import PyroModel
    from bdl.lightning import DeterministicModule, EnsembleModule, MCDropoutModule, SVIModule, VariationalModule

    data = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, generator=data)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(seed)  # the resumed fit must take its random state from the checkpoint, not from here
    if method == "variational":
        module = VariationalModule(nn.Sequential(bdl.BayesLinear(5, 8), nn.ReLU(), bdl.BayesLinear(8, 2)), num_data=96)
    elif method == "mc_dropout":
        module = MCDropoutModule(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2)))
    elif method.startswith("deterministic"):  # the shuffled loader's order alone
        # a cosine schedule read the fit's length in configure_optimizers, which built the loader's iterator before the
        # random state was restored: one draw early, another order
        schedule = "cosine" if method.endswith("cosine") else "constant"
        module = DeterministicModule(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2)), lr_schedule=schedule)
    elif method == "ensemble":  # members drawn at construction, dropout in training
        module = EnsembleModule(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2)), num_members=2, num_val_samples=2)
    elif method == "bdl_svi":  # bdl.SVIModule, bdl.infer's, which resumed with other draws (0.014 apart after 3 epochs)
        module = bdl.SVIModule(PyroModel(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2)), "categorical", num_data=96))
    else:
        decay = 0.1 if method.endswith("lr_decay") else 1.0  # the same for its exponential decay
        module = SVIModule(PyroModel(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2)), num_data=96), lr_decay=decay)
    # the user's own loaders, without generators: their iterators draw seeds from the global generator
    loaders = [DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True), DataLoader(TensorDataset(x[:40], y[:40]), batch_size=20)]
    return module, loaders


@pytest.mark.parametrize("method", ["deterministic", "deterministic_cosine", "variational", "mc_dropout", "ensemble", "svi", "svi_lr_decay", "bdl_svi"])
def test_a_resumed_fit_draws_the_random_numbers_of_an_uninterrupted_one(method, tmp_path, one_thread):
    import lightning as L

    def fit(folder, epochs, seed, ckpt_path=None):
        module, (train, val) = _resume_case(method, seed)
        trainer = L.Trainer(
            max_epochs=3, default_root_dir=folder, logger=False, enable_progress_bar=False, accelerator="cpu",
            enable_model_summary=False, callbacks=[_StopAfter(epochs), L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_last=True)],
        )  # fmt: skip
        module.save_report = False
        trainer.fit(module, train, val, ckpt_path=ckpt_path)
        return torch.cat([p.detach().flatten() for p in module.parameters()])

    reference = fit(tmp_path / "a", 3, seed=0)
    fit(tmp_path / "b", 2, seed=0)
    resumed = fit(tmp_path / "b", 3, seed=1, ckpt_path=tmp_path / "b" / "last.ckpt")
    torch.testing.assert_close(resumed, reference, rtol=0, atol=0)
    if method == "bdl_svi":  # a resumed fit of a PyroModel without num_data continues with the checkpoint's
        import bdl
        from bdl.infer import PyroModel
        from torch import nn

        module, (train, val) = _resume_case(method, 0)
        module.model.num_data = None
        trainer = L.Trainer(max_epochs=3, default_root_dir=tmp_path / "c", logger=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, train, val, ckpt_path=tmp_path / "b" / "last.ckpt")  # (a finished fit: no step more)
        assert module.model.num_data == 96
        # load_from_checkpoint leaves it to the caller: a fit on other data with the checkpoint's size weighted the KL
        # wrongly, silently (it says so: "num_data is None")
        net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
        loaded = bdl.SVIModule.load_from_checkpoint(tmp_path / "b" / "last.ckpt", model=PyroModel(net, "categorical"))
        assert loaded.model.num_data is None


class _NoisyDigits:
    """A training set that adds fresh noise to every input it hands out, as data augmentation does."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        x, y = self.dataset[index]
        return x + torch.randn_like(x), y


def _fit_linear_on_digits(folder, data, callbacks, ckpt_path=None, **trainer_options):
    """Seeded fit of a linear classifier on a digits data module, without logger or validation; its parameters."""
    import lightning as L
    from torch import nn

    from bdl.lightning import DeterministicModule

    L.seed_everything(0)
    module = DeterministicModule(nn.Linear(64, 8), lr=0.05, save_report=False)
    trainer = L.Trainer(
        default_root_dir=folder, logger=False, enable_progress_bar=False, accelerator="cpu", enable_model_summary=False,
        limit_val_batches=0, callbacks=callbacks, **trainer_options,
    )  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_a_resumed_fit_with_loader_workers_sees_the_data_and_augmentation_of_an_uninterrupted_one(tmp_path, one_thread):
    # With worker processes the resumed fit's first epoch replayed epoch 0's order (the workers drew their
    # first indices before Lightning's set_epoch), and persistent workers restarted their augmentation streams.
    import lightning as L

    from bdl.data import Splits
    from bdl.lightning import DigitsDataModule

    class NoisyDigits(DigitsDataModule):
        def build(self) -> Splits:
            splits = super().build()
            return Splits(_NoisyDigits(splits.train), splits.val, splits.test, None, num_classes=splits.num_classes)

    def fit(folder, epochs, ckpt_path=None):
        callbacks = [_StopAfter(epochs), L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_last=True)]
        data = NoisyDigits(batch_size=32, num_workers=1)
        return _fit_linear_on_digits(folder, data, callbacks, ckpt_path, max_epochs=3, limit_train_batches=4)

    reference = fit(tmp_path / "a", 3)
    fit(tmp_path / "b", 2)
    resumed = fit(tmp_path / "b", 3, ckpt_path=tmp_path / "b" / "last.ckpt")
    torch.testing.assert_close(resumed, reference, rtol=0, atol=0)


class _StopAfter(L.Callback):
    """Cuts the run after ``epochs`` epochs, as a killed one is (max_epochs stays as it was)."""

    def __init__(self, epochs):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, module):
        trainer.should_stop = trainer.should_stop or trainer.current_epoch + 1 >= self.epochs


class _Crash(Exception):
    pass


class _RecordUntilCrash(L.Callback):
    """Records ``read(trainer, module, batch)`` at the start of each training batch; raises :class:`_Crash` (a
    killed run) at global step ``crash_at``."""

    def __init__(self, read, crash_at=None):
        self.values, self.read, self.crash_at = [], read, crash_at

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.crash_at:
            raise _Crash
        self.values.append(self.read(trainer, module, batch))


def test_a_fit_resumed_from_a_checkpoint_saved_partway_through_an_epoch_trains_on_that_epochs_remaining_batches(tmp_path, one_thread):
    # Lightning runs the interrupted epoch's remaining batches from a fresh loader: they were the epoch's first
    # ones again (3 batches trained twice, 3 never)
    from bdl.lightning import DigitsDataModule

    def recorder(crash_at=None):  # the epoch and a checksum of each batch
        return _RecordUntilCrash(lambda trainer, module, batch: (trainer.current_epoch, float(batch[0].sum())), crash_at)

    def fit(folder, record, ckpt_path=None):
        callbacks = [record, L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, every_n_train_steps=3, save_last=True)]
        return _fit_linear_on_digits(folder, DigitsDataModule(batch_size=32), callbacks, ckpt_path, max_epochs=2, limit_train_batches=6)

    reference = recorder()
    expected = fit(tmp_path / "a", reference)
    with pytest.raises(_Crash):
        fit(tmp_path / "b", recorder(crash_at=4))
    assert torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["global_step"] == 3  # mid-epoch 0
    after = recorder()
    resumed = fit(tmp_path / "b", after, ckpt_path=tmp_path / "b" / "last.ckpt")
    assert after.values == reference.values[3:]
    torch.testing.assert_close(resumed, expected, rtol=0, atol=0)


def test_a_resumed_pass_starts_partway_only_in_its_own_epoch():
    from bdl.lightning.data import EpochRandomSampler

    sampler = EpochRandomSampler(range(10), seed=3)
    sampler.set_epoch(2)
    order = list(sampler)
    sampler.resume_at(4)
    assert list(sampler) == order[4:] and list(sampler) == order  # once
    sampler.resume_at(4)
    sampler.set_epoch(3)  # Lightning moved on to the next epoch first: that one starts at its beginning
    assert len(list(sampler)) == 10


def test_loaders_rebuilt_every_epoch_start_each_epoch_at_its_beginning(tmp_path, one_thread):
    # the resume offset was read from the previous epoch's batch count when Lightning rebuilt the loader
    import lightning as L
    from torch import nn

    from bdl.lightning import DeterministicModule, DigitsDataModule

    class Count(L.Callback):
        def __init__(self):
            self.seen = {}

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.seen[trainer.current_epoch] = self.seen.get(trainer.current_epoch, 0) + len(batch[1])

    count, data = Count(), DigitsDataModule(batch_size=64)
    trainer = L.Trainer(
        max_epochs=3, default_root_dir=tmp_path, logger=False, enable_progress_bar=False, accelerator="cpu", enable_model_summary=False,
        limit_val_batches=0, reload_dataloaders_every_n_epochs=1, callbacks=[count], enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(DeterministicModule(nn.Linear(64, 8), save_report=False), data)
    size = len(data._built().train)
    assert count.seen == {0: size, 1: size, 2: size}
    assert sum(len(y) for _, y in data.train_dataloader()) == size


def test_under_ddp_the_training_loader_has_lightnings_distributed_order_and_resumes_an_epoch_partway(monkeypatch):
    # Lightning's own DistributedSampler restarted a resumed epoch at its first batch (under DDP, 320 rows
    # trained twice, 298 never, in a 2-process digits run resumed from a step checkpoint)
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler

    from bdl.lightning import DigitsDataModule

    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    progress = SimpleNamespace(started=3, processed=2)  # epoch 2 begun, not finished
    loop = SimpleNamespace(epoch_progress=SimpleNamespace(current=progress),
                           epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=SimpleNamespace(processed=3))))  # fmt: skip
    data = DigitsDataModule(batch_size=16)
    data.trainer = SimpleNamespace(world_size=2, global_rank=1, overfit_batches=0, fit_loop=loop,
                                   distributed_sampler_kwargs={"num_replicas": 2, "rank": 1},
                                   _accelerator_connector=SimpleNamespace(use_distributed_sampler=True, is_distributed=True))  # fmt: skip
    sampler = data.train_dataloader().sampler
    reference = DistributedSampler(data._built().train, num_replicas=2, rank=1, shuffle=True, seed=7)
    reference.set_epoch(2)
    assert isinstance(sampler, DistributedSampler) and sampler.epoch == 2
    assert list(sampler) == list(reference)[3 * 16 :]  # the epoch's order after the 3 batches trained
    assert list(sampler) == list(reference)  # then whole epochs again
    # tensor-parallel ranks share one batch: the replicas are the strategy's data-parallel ones, not the processes
    data.trainer.distributed_sampler_kwargs = {"num_replicas": 1, "rank": 0}
    assert data.train_dataloader().sampler.num_replicas == 1
    # DDP on one device: Lightning puts its sampler there too (which restarted a resumed epoch)
    data.trainer.world_size, data.trainer.global_rank = 1, 0
    assert isinstance(data.train_dataloader().sampler, DistributedSampler)
    data.trainer._accelerator_connector.use_distributed_sampler = False
    assert not isinstance(data.train_dataloader().sampler, DistributedSampler)


class _RandomValues(torch.utils.data.Dataset):
    """A worker's random numbers, one per example (an augmentation's draws)."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.rand(())


def test_ddp_training_workers_are_seeded_by_the_epoch_and_the_rank():
    # under DDP the workers' generator was seeded once per fit: a resumed fit's workers replayed epoch 0's draws,
    # and every rank's workers drew the same numbers
    from types import SimpleNamespace

    from bdl.lightning import DigitsDataModule
    from bdl.lightning.data import _ResumableDistributedSampler

    def loader(rank):
        data = DigitsDataModule(batch_size=4, num_workers=1)
        data.trainer = SimpleNamespace(
            _accelerator_connector=SimpleNamespace(use_distributed_sampler=True, is_distributed=True),
            distributed_sampler_kwargs={"num_replicas": 2, "rank": rank},
            world_size=2,
            overfit_batches=0,
        )
        built = data._loader(_RandomValues(), train=True)
        assert isinstance(built.sampler, _ResumableDistributedSampler)
        return built

    def epoch(built, number):
        built.sampler.set_epoch(number)
        return torch.cat(list(built))

    torch.manual_seed(0)
    uninterrupted = loader(0)
    first, second = epoch(uninterrupted, 0), epoch(uninterrupted, 1)
    assert not torch.equal(first, second)
    torch.manual_seed(0)
    assert torch.equal(epoch(loader(0), 1), second)  # a fit resumed at epoch 1
    torch.manual_seed(0)
    assert not torch.equal(epoch(loader(1), 0), first)


def test_a_fit_resumed_in_double_precision_starts_from_the_checkpoints_float64_weights(tmp_path, one_thread):
    # Lightning loads the checkpoint before its 64-true plugin casts the module: the saved float64 weights went
    # into float32 parameters, and the resumed run started from them rounded (about 1e-8 off, then drifting)
    import lightning as L

    from bdl.lightning import DigitsDataModule

    def fit(folder, epochs, ckpt_path=None):
        callbacks = [_StopAfter(epochs), L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_last=True)]
        data = DigitsDataModule(batch_size=32)
        return _fit_linear_on_digits(folder, data, callbacks, ckpt_path, max_epochs=3, limit_train_batches=4, precision="64-true")

    reference = fit(tmp_path / "a", 3)
    fit(tmp_path / "b", 2)
    resumed = fit(tmp_path / "b", 3, ckpt_path=tmp_path / "b" / "last.ckpt")
    assert reference.dtype == torch.float64
    torch.testing.assert_close(resumed, reference, rtol=0, atol=0)


def test_a_fit_resumed_partway_through_an_epoch_keeps_the_kl_warm_up_of_an_uninterrupted_one(tmp_path, one_thread):
    # the warm-up's weight is read from the epoch and the batch in it: both must come back with the checkpoint (the
    # weights drawn are not those of an uninterrupted run: a resume is exact from an epoch's end only)
    def recorder(crash_at=None):  # the KL weight of each batch
        return _RecordUntilCrash(lambda trainer, module, batch: module.current_kl_weight(), crash_at)

    def fit(folder, record, ckpt_path=None):
        module, (train, _) = _resume_case("variational", seed=0)
        module.kl_warmup_epochs, module.save_report = 2, False
        callbacks = [record, L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_last=True)]
        trainer = L.Trainer(max_epochs=3, default_root_dir=folder, logger=False, enable_progress_bar=False, accelerator="cpu",
                            enable_model_summary=False, limit_val_batches=0, callbacks=callbacks)  # fmt: skip
        trainer.fit(module, train, ckpt_path=ckpt_path)

    reference = recorder()
    fit(tmp_path / "a", reference)
    assert reference.values == pytest.approx([min(1.0, step / 6) for step in range(9)])  # 3 batches per epoch
    with pytest.raises(_Crash):
        fit(tmp_path / "b", recorder(crash_at=5))
    assert torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)["global_step"] == 4  # mid-epoch 1
    after = recorder()
    fit(tmp_path / "b", after, ckpt_path=tmp_path / "b" / "last.ckpt")
    assert after.values == pytest.approx(reference.values[4:])
