"""Training an ANI potential on ANI-format HDF5 data.

Loss, per ensemble member m, averaged over structures b with that target:
    energy:  (E_mb − E_b)² / N_b                      (ANI: squared error scaled by atom count)
    forces:  w · Σ_atoms |F_mb − F_b|² / (3 N_b)
The k stacked members see the same batches but start from different random weights and
their losses do not mix, so one run trains k independent networks.  Self atomic energies
are fitted first by linear least squares on element counts.  AdamW, learning rate
halved on a validation plateau, early stopping on the validation energy RMSE; the
weights with the best validation RMSE are what is saved.

A checkpoint (``OUT.ckpt``) is written atomically after every epoch; ``resume=True``
continues from it.  The batch order of epoch e depends only on (seed, e), so a resumed
run reproduces the uninterrupted one.  Under ``torchrun`` (WORLD_SIZE > 1) the step runs
in DistributedDataParallel, each process taking every world-th batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import pickle
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from aniserve.bench.scoring import conformer_rmse, fit_offsets
from aniserve.elements import NUMBERS
from aniserve.modelfile import build, check_description, describe, save_model
from aniserve.neighbors import molecule_pairs
from aniserve.potential import ANIPotential
from aniserve.training.data import ANIData, Batch
from aniserve.units import HARTREE_IN_KCAL_PER_MOL

log = logging.getLogger(__name__)


#: What may pick a run's epoch (``Settings.selection``).
SELECTIONS = ("loss", "conformer", "forces", "balanced", "all")


@dataclasses.dataclass
class Settings:
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-5
    force_weight: float = 0.1
    plateau_patience: int = 5
    early_stop_patience: int = 15
    min_lr: float = 1e-6
    validation: float = 0.15
    #: What picks the saved epoch and drives the schedule and early stopping: "loss" (the
    #: training objective on the validation molecules), "conformer" (their conformer
    #: RMSE, energies relative to each molecule's mean: blind to energy zeros) or "forces"
    #: (their force RMSE: blind to energies, for a model that serves dynamics),
    #: "balanced" (conformer RMSE plus force RMSE, each as a fraction of the starting
    #: model's: for a transfer that must keep both; the loss weighs absolute energies in
    #: too, and the conformer RMSE alone keeps epochs before forces are learnt) or "all"
    #: (balanced plus the total-energy RMSE, relative to the start's: force-trained
    #: corrections picked by "balanced" stop before the energies of larger molecules are
    #: learnt, docs/notebook.md).
    selection: str = "loss"
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    refit_self_energies: bool = True
    #: Let the starting weights compete with every epoch's on the validation criterion,
    #: so that training which does not help (a fine-tune on a few labels) returns the
    #: start ("epoch 0").  Off by default: a run then returns the best trained epoch.
    start_competes: bool = False


# --------------------------------------------------------------------------- steps
def predict(model: ANIPotential, batch: Batch, forces: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Member energies (k, B) and, if asked, member forces (k, B, N, 3), differentiable."""
    device, dtype = model.device, model.dtype
    numbers = batch.numbers.to(device)
    real = numbers > 0
    species = model.species_indices(numbers[real])
    structure = torch.nonzero(real)[:, 0]
    positions = batch.positions.to(device)
    center, neighbor = molecule_pairs(numbers, positions, model.cutoff)
    pos = positions[real].to(dtype).requires_grad_(forces)
    energies = model(species, center, neighbor, pos[neighbor] - pos[center], structure, len(numbers))
    if not forces:
        return energies, None
    out = energies.new_zeros(len(energies), *real.shape, 3)
    for m in range(len(energies)):
        (grad,) = torch.autograd.grad(
            energies[m].sum(), pos, create_graph=torch.is_grad_enabled() and model.training, retain_graph=True
        )
        out[m][real] = -grad.to(out.dtype)
    return energies, out


def losses(model: ANIPotential, batch: Batch, force_weight: float) -> tuple[torch.Tensor, dict]:
    """The training loss (summed over members) and its parts for the progress line."""
    use_forces = batch.forces is not None and force_weight > 0 and bool(torch.isfinite(batch.forces).any())
    energies, forces = predict(model, batch, use_forces)
    n_atoms = (batch.numbers > 0).sum(1).to(energies.device, torch.float64)
    target = batch.energy.to(energies.device)
    has_e = torch.isfinite(target)
    total = energies.new_zeros(())
    parts = {}
    if has_e.any():
        err = (energies[:, has_e] - target[has_e]) ** 2 / n_atoms[has_e]
        energy_loss = err.mean(1).sum()
        total = total + energy_loss
        parts["energy"] = float(energy_loss.detach()) / len(energies)
    if use_forces:
        assert batch.forces is not None and forces is not None  # use_forces: the data and the model give them
        ref = batch.forces.to(energies.device)
        has_f = torch.isfinite(ref).flatten(1).all(1) & (batch.numbers > 0).any(1).to(ref.device)
        if has_f.any():
            diff = (forces[:, has_f] - ref[has_f].nan_to_num()) ** 2
            per_structure = diff.sum((2, 3)) / (3 * n_atoms[has_f])
            force_loss = force_weight * per_structure.mean(1).sum()
            total = total + force_loss
            parts["forces"] = float(force_loss.detach()) / len(energies)
    return total, parts


@torch.no_grad()
def network_part(model: ANIPotential, batch: Batch) -> torch.Tensor:
    """Ensemble-mean energy minus the self-energy sum, (B,) Hartree."""
    energies, _ = predict(model, batch, False)
    numbers = batch.numbers.to(model.device)
    species = model.species_indices(numbers[numbers > 0])
    offsets = torch.zeros(len(numbers), dtype=torch.float64, device=model.device)
    offsets.index_add_(0, torch.nonzero(numbers > 0)[:, 0], model.self_energies[species])
    return energies.mean(0) - offsets


def fit_self_energies(model: ANIPotential, data: ANIData, batch_size: int = 256) -> dict[str, float]:
    """Least-squares self energies: Σ_e n_e·s_e ≈ E_ref − (network part of E_model).

    On a fresh model this is the usual linear fit of energies on element counts; on a
    pretrained one it moves the energy zero to the new level of theory without touching
    what the networks learned."""
    rows, residuals = [], []
    column = {NUMBERS[e]: i for i, e in enumerate(model.elements)}
    for batch in data.batches(batch_size):
        keep = torch.isfinite(batch.energy)
        if not keep.any():
            continue
        rest = batch.energy.to(model.device) - network_part(model, batch)
        for b in torch.nonzero(keep)[:, 0].tolist():
            counts = np.zeros(len(model.elements))
            for z in batch.numbers[b][batch.numbers[b] > 0].tolist():
                counts[column[z]] += 1
            rows.append(counts)
            residuals.append(float(rest[b]))
    # Fit the change from the current self energies (least squares, minimum norm): where
    # the data's compositions do not determine every element (one molecule's labels, in
    # ``aniserve learn``), the rest keeps its value.  Fitted absolutely, one composition
    # CH₃NO had given H −42.4 Ha and C, N, O −14.1 each.
    table = np.array(rows).reshape(-1, len(model.elements))
    current = model.self_energies.detach().cpu().numpy()
    change, present = fit_offsets(table, np.array(residuals) - table @ current, "self-energy")
    fitted = {e: float(current[i] + change[i] * present[i]) for i, e in enumerate(model.elements)}
    model.self_energies.copy_(torch.tensor([fitted[e] for e in model.elements], dtype=torch.float64))
    return fitted


@torch.no_grad()
def validate(model: ANIPotential, data: ANIData, batch_size: int = 128, force_weight: float = 0.0) -> dict:
    """Errors of the ensemble mean: energy RMSE/MAE (kcal/mol), force RMSE (kcal/mol/Å)
    when ``force_weight`` > 0 and the data has forces, and ``loss``, the training
    objective's form (ΔE²/N + force_weight·|ΔF|²/3N per structure, Hartree²) — what model
    selection and the learning-rate schedule follow."""
    was_training = model.training
    model.eval()
    use_forces = force_weight > 0 and data.forces_key is not None
    de, df, loss, molecules = [], [], [], []
    for batch in data.batches(batch_size):
        with torch.enable_grad():
            energies, predicted_forces = predict(model, batch, use_forces)
        n_atoms = (batch.numbers > 0).sum(1).to(torch.float64)
        keep = torch.isfinite(batch.energy)
        error = energies.mean(0).detach().cpu() - batch.energy
        de.append(error[keep])
        molecules += [m for m, k in zip(batch.molecule, keep.tolist()) if k]
        per_structure = torch.where(keep, error.nan_to_num() ** 2 / n_atoms, 0.0)
        if use_forces and batch.forces is not None and predicted_forces is not None:
            mean_f = predicted_forces.mean(0).detach().cpu()
            mask = torch.isfinite(batch.forces).all(-1) & (batch.numbers > 0)
            df.append((mean_f[mask] - batch.forces[mask]).flatten())
            squared = torch.where(mask[..., None], (mean_f - batch.forces.nan_to_num()) ** 2, 0.0)
            per_structure = per_structure + force_weight * squared.sum((1, 2)) / (3 * n_atoms)
        loss.append(per_structure)
    model.train(was_training)
    errors = torch.cat(de) * HARTREE_IN_KCAL_PER_MOL if de else torch.zeros(0)
    out = {
        "energy_rmse_kcal": float(errors.pow(2).mean().sqrt()) if len(errors) else math.nan,
        "energy_mae_kcal": float(errors.abs().mean()) if len(errors) else math.nan,
        "conformer_rmse_kcal": conformer_rmse(errors.numpy(), molecules),
        "loss": float(torch.cat(loss).mean()) if loss else math.nan,
    }
    if df:
        f = torch.cat(df) * HARTREE_IN_KCAL_PER_MOL
        out["force_rmse_kcal_per_a"] = float(f.pow(2).mean().sqrt())
    return out


class _Step(nn.Module):
    """The loss as a module, so DistributedDataParallel can wrap it."""

    def __init__(self, model: ANIPotential, force_weight: float, penalty=None):
        super().__init__()
        self.model, self.force_weight, self.penalty = model, force_weight, penalty

    def forward(self, batch: Batch):
        loss, parts = losses(self.model, batch, self.force_weight)
        if self.penalty is not None:
            extra = self.penalty(self.model)
            loss = loss + extra
            parts["penalty"] = float(extra.detach())
        return loss, parts


# ------------------------------------------------------------------------- trainer
def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() and os.environ.get("ANISERVE_DDP_BACKEND") != "gloo" else "gloo"
        )
    return (dist.get_rank(), dist.get_world_size()) if world > 1 else (0, 1)


def _say(rank: int, text: str) -> None:
    """Progress, from the first process only (the others train the same epochs)."""
    if rank == 0:
        log.info(text)


@dataclasses.dataclass
class _Progress:
    """What a run carries from epoch to epoch, and what a checkpoint restores."""

    trainable: set[str]
    history: list[dict] = dataclasses.field(default_factory=list)
    start_epoch: int = 0
    best: dict = dataclasses.field(default_factory=lambda: {"loss": math.inf, "rmse": math.inf, "epoch": -1})
    best_state: dict | None = None
    #: The starting weights' validation metrics ("balanced" selection measures against them).
    start: dict | None = None


def train(
    model: ANIPotential,
    data: ANIData,
    out: str | os.PathLike,
    settings: Settings,
    resume: bool = False,
    extra: dict | None = None,
    validation_data: ANIData | None = None,
    penalty=None,
) -> dict:
    """Train ``model`` (parameters with requires_grad) on ``data``; write ``out``.

    penalty: optional ``penalty(model) -> scalar tensor`` added to every step's loss
    (a transfer strategy's regulariser, e.g. L2-SP).
    Returns the run's summary (also stored in the model file under ``training``)."""
    rank, world = _distributed()
    out = pathlib.Path(out)
    checkpoint_path = out.with_name(out.name + ".ckpt")
    train_data, val_data = _splits(model, data, settings, validation_data)
    progress = _Progress({name for name, p in model.named_parameters() if p.requires_grad})
    model.train()
    state = _load_checkpoint(checkpoint_path) if resume and checkpoint_path.exists() else None
    if state is not None:
        model = _restore_model(state, checkpoint_path, settings, model.dtype, progress)
        _say(rank, f"resuming from {checkpoint_path} after epoch {state['epoch'] + 1}")
    elif settings.refit_self_energies:
        fitted = fit_self_energies(model, train_data)
        _say(rank, "self energies (Ha): " + ", ".join(f"{e} {v:.6f}" for e, v in fitted.items()))

    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("nothing to train: the strategy froze every parameter")
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=settings.plateau_patience)
    progress.best_state = {k: v.clone() for k, v in model.state_dict().items()}
    if state is not None:
        _restore_optimiser(state, checkpoint_path, model, optimizer, scheduler, progress)

    step_force_weight = settings.force_weight if data.forces_key else 0.0
    step: nn.Module = _Step(model, step_force_weight, penalty)
    if world > 1:
        step = nn.parallel.DistributedDataParallel(step, find_unused_parameters=True)
    n_params = sum(p.numel() for p in parameters)
    _say(
        rank,
        f"training {n_params} of {sum(p.numel() for p in model.parameters())} parameters "
        f"({model.ensemble_size} members) on {len(train_data)} conformations, "
        f"validating on {len(val_data)}; {world} process(es)",
    )

    if state is None and (settings.start_competes or settings.selection in _RELATIVE_SUMS):
        start = progress.start = validate(model, val_data, force_weight=step_force_weight)
        if settings.start_competes:
            _select(start, settings, -1, model, None, progress)
            _say(
                rank,
                f"the start: validation loss {start['loss']:.3e}, energy RMSE {start['energy_rmse_kcal']:.3f} kcal/mol",
            )
    best = progress.best
    for epoch in range(progress.start_epoch, settings.epochs):
        if epoch - best["epoch"] > settings.early_stop_patience or optimizer.param_groups[0]["lr"] < settings.min_lr:
            _say(rank, f"stopping early at epoch {epoch}: no improvement since epoch {best['epoch'] + 1}")
            break
        started = time.perf_counter()
        train_loss = _train_epoch(step, optimizer, train_data, settings, epoch, rank, world, model.ensemble_size)
        metrics = validate(model, val_data, force_weight=step_force_weight)
        improved = _select(metrics, settings, epoch, model, scheduler, progress)
        best = progress.best
        progress.history.append(
            {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                **metrics,
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": time.perf_counter() - started,
            }
        )
        _report_epoch(rank, settings, epoch, train_loss, metrics, improved, optimizer, started, progress.history)
        if rank == 0:
            _save_checkpoint(checkpoint_path, model, optimizer, scheduler, epoch, progress)

    assert progress.best_state is not None
    model.load_state_dict(progress.best_state)
    summary = {
        "best_epoch": best["epoch"] + 1,
        "validation_loss": best["loss"],
        "validation_energy_rmse_kcal": best["rmse"],
        "validation_conformer_rmse_kcal": best.get("conformer_rmse", math.nan),
        "validation_force_rmse_kcal_per_a": best.get("force_rmse", math.nan),
        "validation_start": progress.start,
        "epochs_run": len(progress.history),
        "trainable_parameters": n_params,
        "seed": settings.seed,
        "data": [str(p) for p in data.paths],
        "validation_groups": sorted({g.name for g in val_data.groups}),
        "energy_key": data.energy_key,
        "forces_key": data.forces_key,
        "history": progress.history,
    }
    if rank == 0:
        if model.ensemble_size > 1:
            _calibrate(model, val_data, rank)
        save_model(model, out, extra={"training": {**summary, **(extra or {})}})
        _say(
            rank,
            f"wrote {out} (the weights of epoch {best['epoch'] + 1}, the lowest validation {settings.selection}: "
            f"energy RMSE {best['rmse']:.3f}, conformer RMSE {best.get('conformer_rmse', math.nan):.3f} kcal/mol)",
        )
    if world > 1:
        dist.barrier()
    return summary


# ------------------------------------------------------------- the steps of a run
def _splits(model: ANIPotential, data: ANIData, settings: Settings, validation_data: ANIData | None):
    """(training, validation) data, after the checks that need nothing trained."""
    data.check_elements(model.elements)
    if validation_data is None:
        train_data, val_data = data.split(settings.validation, settings.seed)
    else:
        train_data, val_data = data, validation_data
    if len(val_data) == 0:
        raise ValueError("the validation split is empty: the data needs at least two molecules (formula groups)")
    if settings.selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, got {settings.selection!r}")
    if settings.selection in ("forces", *_RELATIVE_SUMS) and (data.forces_key is None or settings.force_weight <= 0):
        raise ValueError(f"selection {settings.selection!r} needs force labels and a force weight above 0")
    return train_data, val_data


def _load_checkpoint(path: pathlib.Path) -> dict:
    """A checkpoint's contents (tensors and plain data only); a damaged or foreign file
    is a ValueError naming it."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except _CHECKPOINT_ERRORS as error:
        raise _bad_checkpoint(path, error) from None


def _restore_model(state: dict, path: pathlib.Path, settings: Settings, dtype, progress: _Progress) -> ANIPotential:
    """The checkpoint's model, with what trains and where the run stood."""
    try:  # a checkpoint is a file like any other: damaged or foreign ones get a clear error
        description = json.loads(state["description"])
        check_description(description, path)
        model = build(description).to(device=settings.device, dtype=dtype)
        model.load_state_dict(state["model"])
        progress.trainable = set(state["trainable"])
        progress.history = json.loads(state["history"])
        progress.start_epoch = state["epoch"] + 1
        progress.best = json.loads(state["best"])
        progress.start = json.loads(state.get("start", "null"))
    except _CHECKPOINT_ERRORS as error:
        raise _bad_checkpoint(path, error) from None
    for name, p in model.named_parameters():
        p.requires_grad_(name in progress.trainable)
    model.train()
    return model


def _restore_optimiser(state: dict, path: pathlib.Path, model, optimizer, scheduler, progress: _Progress) -> None:
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(json.loads(state["scheduler"]))
        progress.best_state = state["best_model"]
        model.load_state_dict(progress.best_state)  # checks it fits, before any epoch runs
        model.load_state_dict(state["model"])
    except _CHECKPOINT_ERRORS as error:
        raise _bad_checkpoint(path, error) from None


def _train_epoch(
    step, optimizer, train_data: ANIData, settings: Settings, epoch: int, rank: int, world: int, ensemble_size: int
) -> float:
    """One pass over this process's share of the batches; the mean training loss."""
    plan = train_data.plan(settings.batch_size, seed=settings.seed * 100_003 + epoch)
    plan = plan[: len(plan) // world * world][rank::world] if world > 1 else plan
    total, count = 0.0, 0
    with tqdm(
        total=len(plan),
        desc=f"epoch {epoch + 1}/{settings.epochs}",
        unit="batch",
        leave=False,
        disable=rank != 0 or not sys.stderr.isatty(),
    ) as bar:
        for items in plan:
            batch = train_data.read(items)
            optimizer.zero_grad(set_to_none=True)
            loss, parts = step(batch)
            if not torch.isfinite(loss):
                raise ValueError(
                    f"the training loss is {loss.item()} at epoch {epoch + 1} (molecules "
                    f"{', '.join(sorted(set(batch.group))[:5])}); stopping without writing a model"
                )
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) / ensemble_size
            count += 1
            bar.set_postfix_str(f"loss {total / count:.3e}", refresh=False)
            bar.update(1)
    return total / max(count, 1)


#: What the "balanced" and "all" selections add up, each relative to the starting model's.
_RELATIVE_SUMS = {
    "balanced": ("conformer_rmse_kcal", "force_rmse_kcal_per_a"),
    "all": ("energy_rmse_kcal", "conformer_rmse_kcal", "force_rmse_kcal_per_a"),
}


def _select(metrics: dict, settings: Settings, epoch: int, model, scheduler, progress: _Progress) -> bool:
    """Step the schedule (if given) on the selection criterion and keep the epoch's
    weights when it is the best so far (epoch −1: the starting weights); whether it was."""
    criterion, start = metrics["loss"], progress.start or {}
    if settings.selection == "conformer" and math.isfinite(metrics["conformer_rmse_kcal"]):
        # (NaN when no validation molecule has two conformations: the loss decides then,
        # for "balanced" and "all" too.)
        criterion = metrics["conformer_rmse_kcal"]
    elif settings.selection == "forces" and math.isfinite(metrics.get("force_rmse_kcal_per_a", math.nan)):
        criterion = metrics["force_rmse_kcal_per_a"]
    elif settings.selection in _RELATIVE_SUMS and all(
        math.isfinite(metrics.get(k, math.nan)) and start.get(k, 0) > 0 for k in _RELATIVE_SUMS[settings.selection]
    ):
        criterion = sum(metrics[k] / start[k] for k in _RELATIVE_SUMS[settings.selection])
    if scheduler is not None:
        scheduler.step(criterion)
    best = progress.best
    improved = criterion < best.get("criterion", best["loss"])
    if improved:
        progress.best = {
            "loss": metrics["loss"],
            "rmse": metrics["energy_rmse_kcal"],
            "conformer_rmse": metrics["conformer_rmse_kcal"],
            "force_rmse": metrics.get("force_rmse_kcal_per_a", math.nan),
            "criterion": criterion,
            "epoch": epoch,
        }
        progress.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return improved


def _calibrate(model: ANIPotential, val_data: ANIData, rank: int) -> None:
    """Fit the spread's calibration on the validation molecules (stored with the model)."""
    from aniserve.training.calibration import calibrate

    try:
        fitted = calibrate(model, val_data, f"{len(val_data)} validation conformations of the training run")
    except ValueError as error:  # e.g. no validation energies (a forces-only set)
        _say(rank, f"the spread is not calibrated: {error}")
        return
    _say(
        rank,
        f"spread calibration on the validation molecules: energy_std = {fitted['energy_std_scale']:.3f} × the "
        f"members' std; collection threshold {fitted['collect_threshold_kcal']:.3f} kcal/mol per √atom",
    )


def _report_epoch(rank, settings, epoch, train_loss, metrics, improved, optimizer, started, history) -> None:
    force_text = (
        f", forces {metrics['force_rmse_kcal_per_a']:.2f} kcal/mol/Å" if "force_rmse_kcal_per_a" in metrics else ""
    )
    spent = time.perf_counter() - started
    left = (settings.epochs - epoch - 1) * sum(h["seconds"] for h in history[-3:]) / len(history[-3:])
    _say(
        rank,
        f"epoch {epoch + 1}/{settings.epochs}: train loss {train_loss:.3e}, validation loss "
        f"{metrics['loss']:.3e} (energy RMSE {metrics['energy_rmse_kcal']:.3f} kcal/mol{force_text})"
        f"{' *' if improved else ''}, lr {optimizer.param_groups[0]['lr']:.1e}, {spent:.1f} s, "
        f"at most {tqdm.format_interval(left)} left",
    )


def _save_checkpoint(path, model, optimizer, scheduler, epoch: int, progress: _Progress) -> None:
    _atomic_save(
        {
            "model": model.state_dict(),
            "best_model": progress.best_state,
            "optimizer": optimizer.state_dict(),
            "scheduler": json.dumps(scheduler.state_dict()),
            "epoch": epoch,
            "trainable": sorted(progress.trainable),
            "history": json.dumps(progress.history),
            "best": json.dumps(progress.best),
            "start": json.dumps(progress.start),
            "description": json.dumps(describe(model)),
        },
        path,
    )


_CHECKPOINT_ERRORS = (
    RuntimeError,
    OSError,
    EOFError,
    KeyError,
    TypeError,
    ValueError,
    AttributeError,
    IndexError,
    pickle.UnpicklingError,
)


def _bad_checkpoint(path, error: Exception) -> ValueError:
    return ValueError(
        f"{path}: not a usable aniserve checkpoint ({type(error).__name__}: {str(error)[:200]}); "
        f"delete it to start afresh"
    )


def _atomic_save(obj: dict, path: pathlib.Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
