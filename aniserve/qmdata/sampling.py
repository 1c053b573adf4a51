"""Molecules from SMILES or XYZ, and normal-mode sampling of their conformations.

Normal-mode sampling (NMS) follows ANI-1 (Smith, Isayev, Roitberg, Chem. Sci. 8, 3192,
2017): around an optimised geometry with normal modes q_i and force constants K_i,
draw c_i uniformly, rescale them so that their sum is itself uniform in [0, 1], and
displace along each mode by R_i = ±sqrt(3 c_i N_a k_B T / K_i).  The Hessian comes from
the MMFF94 force field in RDKit (finite differences of its analytic gradient): cheap,
available for every CHNO molecule here, and only used to choose displacement
directions and sizes, never as a reference energy.
"""

from __future__ import annotations

import dataclasses
import pathlib
import zlib

import numpy as np

from aniserve.units import BOLTZMANN_HARTREE_PER_K, HARTREE_IN_KCAL_PER_MOL

#: k_B in kcal/mol/K, the energy unit of MMFF.
_KB_KCAL = BOLTZMANN_HARTREE_PER_K * HARTREE_IN_KCAL_PER_MOL
#: Force constants below this (kcal/mol/Å²) are raised to it: torsions and other
#: floppy modes would otherwise get displacements of several Å.
_MIN_FORCE_CONSTANT = 5.0
#: A sampled geometry is rejected if two atoms come closer than this fraction of the
#: sum of their covalent radii.
_MIN_CONTACT_FRACTION = 0.65


@dataclasses.dataclass(frozen=True)
class MoleculeSpec:
    """One molecule of a list: its SMILES (or XYZ path) and a name."""

    source: str
    name: str


@dataclasses.dataclass
class Equilibrium:
    """An MMFF-optimised molecule: atoms sorted by decreasing atomic number."""

    spec: MoleculeSpec
    numbers: np.ndarray  # (N,) int
    positions: np.ndarray  # (N, 3) Å
    hessian: np.ndarray  # (3N, 3N) kcal/mol/Å²


def read_molecule_list(path: str | pathlib.Path) -> list[MoleculeSpec]:
    """Read a list: one SMILES or ``.xyz`` path per line, optional name after it."""
    path = pathlib.Path(path)
    specs = []
    for line in path.read_text().splitlines():
        # Only whole-line comments: '#' inside a SMILES is a triple bond.
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        source = fields[0]
        if source.endswith(".xyz"):
            source = str((path.parent / source).resolve())
        specs.append(MoleculeSpec(source, fields[1] if len(fields) > 1 else fields[0]))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: molecule names repeat; each line needs a distinct name")
    return specs


def _rdkit_molecule(spec: MoleculeSpec):
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds, rdDistGeom

    if spec.source.endswith(".xyz"):
        mol = Chem.MolFromXYZFile(spec.source)
        if mol is None:
            raise ValueError(f"{spec.source}: not a readable XYZ file")
        rdDetermineBonds.DetermineBonds(mol, charge=0)
    else:
        mol = Chem.MolFromSmiles(spec.source)
        if mol is None:
            raise ValueError(f"{spec.name}: RDKit cannot parse SMILES {spec.source!r}")
        mol = Chem.AddHs(mol)
        if rdDistGeom.EmbedMolecule(mol, randomSeed=_stable_seed(spec.source)) != 0:
            raise ValueError(f"{spec.name}: RDKit could not embed {spec.source!r} in 3D")
    return mol


def _mmff_hessian(ff, x0: np.ndarray, step: float = 1e-3) -> np.ndarray:
    """Central differences of the MMFF energy, kcal/mol/Å².

    Energies, not gradients: RDKit's ``CalcGrad(positions)`` disagrees with
    ``CalcEnergy(positions)`` (its Hessian comes out asymmetric and missing modes),
    while energy differences give the expected spectrum.
    """
    n3 = x0.size

    def energy(x):
        return ff.CalcEnergy(x.tolist())

    unit = np.eye(n3) * step
    hessian = np.empty((n3, n3))
    for i in range(n3):
        for j in range(i, n3):
            hessian[i, j] = hessian[j, i] = (
                energy(x0 + unit[i] + unit[j])
                - energy(x0 + unit[i] - unit[j])
                - energy(x0 - unit[i] + unit[j])
                + energy(x0 - unit[i] - unit[j])
            ) / (4 * step * step)
    return hessian


def _stable_seed(*parts) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode()) & 0x7FFFFFFF


def optimise(spec: MoleculeSpec) -> Equilibrium:
    """MMFF-optimise a molecule and compute its MMFF Hessian by central differences."""
    from rdkit.Chem import rdForceFieldHelpers

    mol = _rdkit_molecule(spec)
    props = rdForceFieldHelpers.MMFFGetMoleculeProperties(mol)
    if props is None:
        raise ValueError(f"{spec.name}: MMFF94 has no parameters for this molecule")
    ff = rdForceFieldHelpers.MMFFGetMoleculeForceField(mol, props)
    # The minimiser can stop on a saddle (eclipsed ethane from a symmetric
    # embedding): push along the negative-curvature mode and minimise again.
    for _ in range(10):
        ff.Minimize(maxIts=10000, forceTol=1e-6)
        x0 = np.array(ff.Positions(), dtype=float)
        hessian = _mmff_hessian(ff, x0)
        values, vectors = np.linalg.eigh(hessian)
        if values[0] > -0.1:
            break
        pushed = x0 + 0.2 * vectors[:, 0]
        for i, p in enumerate(pushed.reshape(-1, 3)):
            mol.GetConformer().SetAtomPosition(i, p.tolist())
        ff = rdForceFieldHelpers.MMFFGetMoleculeForceField(mol, props)
    numbers = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
    order = np.argsort(-numbers, kind="stable")
    idx3 = (3 * order[:, None] + np.arange(3)).ravel()
    return Equilibrium(spec, numbers[order], x0.reshape(-1, 3)[order], hessian[np.ix_(idx3, idx3)])


def normal_modes(eq: Equilibrium) -> tuple[np.ndarray, np.ndarray]:
    """Cartesian unit normal modes (M, N, 3) and their force constants (M,), kcal/mol/Å².

    The mass-weighted Hessian is diagonalised in the space orthogonal to rigid
    translations and rotations (projected out explicitly: soft torsions can have
    smaller eigenvalues than an imperfectly converged rotation), then each mode is
    mapped back to Cartesian and normalised.
    """
    from rdkit.Chem import GetPeriodicTable

    table = GetPeriodicTable()
    masses = np.array([table.GetAtomicWeight(int(z)) for z in eq.numbers])
    n = len(masses)
    sqrt_m = np.repeat(np.sqrt(masses), 3)
    centred = eq.positions - (masses[:, None] * eq.positions).sum(0) / masses.sum()
    rigid = []
    for axis in np.eye(3):
        rigid.append(np.tile(axis, n) * sqrt_m)  # translation
        rigid.append(np.cross(axis, centred).ravel() * sqrt_m)  # rotation
    u, s, _ = np.linalg.svd(np.array(rigid).T, full_matrices=True)
    rank = int((s > 1e-6 * s.max()).sum())
    internal = u[:, rank:]  # orthonormal basis of vibrations
    h_mw = eq.hessian / sqrt_m[:, None] / sqrt_m[None, :]
    _, vecs = np.linalg.eigh(internal.T @ h_mw @ internal)
    cart = (internal @ vecs) / sqrt_m[:, None]
    cart /= np.linalg.norm(cart, axis=0)
    force_constants = np.einsum("im,ij,jm->m", cart, eq.hessian, cart)
    return cart.T.reshape(-1, n, 3), force_constants


def sample_conformation(eq: Equilibrium, index: int, t_min=50.0, t_max=600.0):
    """Conformation ``index`` of a molecule: deterministic in (SMILES, index).

    Index 0 is the MMFF equilibrium itself; others are NMS displacements at a
    temperature drawn uniformly from [t_min, t_max] K.  Returns (positions, T).
    """
    if index == 0:
        return eq.positions.copy(), 0.0
    rng = np.random.default_rng(_stable_seed(eq.spec.source, index))
    modes, k = normal_modes(eq)
    n_atoms = len(eq.numbers)
    radii = _covalent_radii(eq.numbers)
    for _ in range(100):
        temperature = rng.uniform(t_min, t_max)
        c = rng.uniform(size=len(k))
        c *= rng.uniform() / max(c.sum(), 1e-12)
        amp = np.sqrt(3 * c * n_atoms * _KB_KCAL * temperature / np.maximum(k, _MIN_FORCE_CONSTANT))
        amp *= rng.choice([-1.0, 1.0], size=len(k))
        positions = eq.positions + np.einsum("m,mij->ij", amp, modes)
        if _plausible(positions, radii):
            return positions, temperature
    raise RuntimeError(f"{eq.spec.name}: no plausible sample in 100 tries at index {index}")


def _covalent_radii(numbers):
    from rdkit.Chem import GetPeriodicTable

    table = GetPeriodicTable()
    return np.array([table.GetRcovalent(int(z)) for z in numbers])


def _plausible(positions, radii) -> bool:
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    limit = _MIN_CONTACT_FRACTION * (radii[:, None] + radii[None])
    np.fill_diagonal(d, np.inf)
    return bool((d > limit).all())
