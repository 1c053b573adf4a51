"""What a training benchmark may spend: epochs, seeds, network sizes and the optimiser's
settings, one type for every benchmark that trains (``bench transfer``, ``bench active``).
The presets say what each full and quick run uses; ``--budget KEY=JSON`` overrides a field."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Budget:
    #: Epochs of the benchmark's own DFT pretraining (0: it starts from a given model).
    pretrain_epochs: int
    transfer_epochs: int
    seeds: tuple[int, ...]
    #: Members of the pretrained ensemble (0: the base model's own).
    ensemble_size: int
    hidden: tuple[int, ...] = (64, 48, 24)
    batch_size: int = 32
    lr: float = 1e-3
    transfer_lr: float | None = None  # default: lr
    #: AdamW's decoupled weight decay in the transfer runs (the trainer's default otherwise).
    transfer_weight_decay: float = 1e-5
    force_weight: float = 0.1  # of the DFT force loss in pretraining
    #: Of the high level's force loss in the transfer runs (multi-fidelity: the
    #: conformations with coupled-cluster forces add them to their energies); 0: energies only.
    high_force_weight: float = 0.0
    patience: int = 30  # epochs without validation improvement before stopping
    selection: str = "loss"  # of the transfer runs: one of the trainer's SELECTIONS
    #: Transfer in two stages: energies only first (force weight 0, epochs by conformer
    #: RMSE), then the same model trained on with ``high_force_weight`` and ``selection``.
    #: Trained from the start with forces, a correction stops before the energies of
    #: larger molecules are learnt (docs/notebook.md, "Forces after energies").
    energies_first: bool = False
    #: Labelled-set sizes, in rounds (``bench active``).
    ks: tuple[int, ...] = ()

    def __post_init__(self):
        if self.energies_first and self.high_force_weight <= 0:
            raise ValueError("energies_first adds a second stage with forces: it needs high_force_weight above 0")

    def pretraining(self) -> dict:
        """The fields that decide the pretrained model (its cache key)."""
        skip = ("transfer_epochs", "transfer_lr", "transfer_weight_decay", "seeds", "ks")
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

    def transfer_settings(self, seed: int):
        """The trainer's settings for one transfer run."""
        from aniserve.training import Settings

        return Settings(
            epochs=self.transfer_epochs,
            batch_size=self.batch_size,
            lr=self.transfer_lr or self.lr,
            weight_decay=self.transfer_weight_decay,
            seed=seed,
            force_weight=self.high_force_weight,
            early_stop_patience=self.patience,
            plateau_patience=max(1, self.patience // 3),
            selection=self.selection,
        )

    def energies_stage_settings(self, seed: int):
        """The first stage's settings when ``energies_first``: energies only, epochs by
        conformer RMSE (the embedded default's recipe); same seed, so same validation split."""
        return dataclasses.replace(self.transfer_settings(seed), force_weight=0.0, selection="conformer")

    def pretrain_settings(self, seed: int):
        """The trainer's settings for the DFT pretraining (energies and forces)."""
        from aniserve.training import Settings

        return Settings(
            epochs=self.pretrain_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=seed,
            force_weight=self.force_weight,
            early_stop_patience=self.patience,
            plateau_patience=max(1, self.patience // 3),
        )

    def with_changes(self, seeds: int | None = None, overrides: dict[str, Any] | None = None) -> Budget:
        """This budget with ``seeds`` seeds (0 … seeds−1) and fields overridden
        (ValueError naming unknown ones); ``seeds=[3, 4]`` among the overrides runs those
        seeds (more seeds of a finished run, without repeating it)."""
        budget = dataclasses.replace(self, seeds=tuple(range(seeds))) if seeds else self
        overrides = dict(overrides or {})
        fields = {f.name for f in dataclasses.fields(budget)}
        unknown = set(overrides) - fields
        if unknown:
            raise ValueError(f"unknown budget field(s) {sorted(unknown)}; known: {sorted(fields)}")
        for key in ("hidden", "ks", "seeds"):
            if key in overrides:
                overrides[key] = tuple(sorted(overrides[key])) if key == "ks" else tuple(overrides[key])
        return dataclasses.replace(budget, **overrides)


#: ``bench transfer`` from its own DFT pretraining.  Chosen on the session-3 data snapshot
#: (docs/notebook.md, "What we tried"): batches of 8 and a force weight of 1 gave the best
#: DFT model; larger force weights and smaller networks did worse, and a 10× smaller
#: transfer learning rate barely moved the models.
TRANSFER = Budget(
    pretrain_epochs=400,
    transfer_epochs=400,
    seeds=(0, 1, 2),
    ensemble_size=4,
    batch_size=8,
    force_weight=1.0,
    patience=60,
)
TRANSFER_QUICK = Budget(pretrain_epochs=12, transfer_epochs=12, seeds=(0,), ensemble_size=2, hidden=(32, 16, 8))
#: ``bench transfer --base``: no pretraining; ensemble size and networks are the base's
#: own.  Epochs are picked (and training stopped) on the validation molecules' conformer
#: RMSE: chosen by 5-fold cross-validation over the *training* molecules
#: (docs/notebook.md, "What we tried"), where it beat selection on the validation loss
#: for Δ-learning from ANI-1x (0.90 against 1.09 kcal/mol; ANI-1x itself 1.13).
FROM_BASE = Budget(
    pretrain_epochs=0,
    transfer_epochs=60,
    seeds=(0, 1, 2),
    ensemble_size=0,
    batch_size=16,
    lr=1e-3,
    patience=15,
    selection="conformer",
)
FROM_BASE_QUICK = Budget(
    pretrain_epochs=0, transfer_epochs=4, seeds=(0,), ensemble_size=0, batch_size=32, patience=4, selection="conformer"
)
#: ``bench active --base MODEL``: every selection transferred from the base as ``FROM_BASE`` does.
ACTIVE = dataclasses.replace(FROM_BASE, ks=(32, 64, 128))
ACTIVE_QUICK = dataclasses.replace(FROM_BASE, ks=(8, 16), seeds=(0,), transfer_epochs=3, batch_size=8, patience=3)
#: ``bench active`` (its default ``--base student``): the student is pretrained here, a small
#: ensemble on the teacher's labels of the pool file's normal-mode conformations; its
#: rounds fine-tune every weight on the labels and a replayed sample of that data.  The
#: learning rate is lower than the pretraining's: in a first try at 1e-3 the validation
#: molecules' force RMSE jumped by 1–2 kcal/mol/Å from one epoch to the next.
ACTIVE_STUDENT = dataclasses.replace(
    ACTIVE, pretrain_epochs=40, ensemble_size=4, force_weight=1.0, transfer_lr=3e-4, transfer_epochs=40, patience=10
)
ACTIVE_STUDENT_QUICK = dataclasses.replace(
    ACTIVE_QUICK, pretrain_epochs=2, ensemble_size=2, hidden=(32, 16, 8), force_weight=1.0
)
