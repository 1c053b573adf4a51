"""The committed quantum-chemistry data set: what data/README.md says it holds, and what
issue #3 asked of it (sizes, heavy-atom ranges, no test molecule in training)."""

import re

import h5py
import numpy as np
import pytest
from conftest import ROOT

LOW, HIGH = "wb97x_631gd.energy", "ccsd(t)_ccpvdz.energy"


def contents(name):
    molecules, low, high, heavy = set(), 0, 0, {}
    with h5py.File(ROOT / "data" / name, "r") as f:
        for group in f.values():
            numbers = group["atomic_numbers"][()]
            names = [m.decode() for m in group["molecule"][()]]
            e_low, e_high = group[LOW][()], group[HIGH][()]
            low, high = low + int(np.isfinite(e_low).sum()), high + int(np.isfinite(e_high).sum())
            assert np.all(np.isfinite(e_high) <= np.isfinite(e_low)), "high level only where the low level is"
            forces = group["wb97x_631gd.forces"][()]
            assert np.all(np.isfinite(forces[np.isfinite(e_low)]))
            for molecule in names:
                molecules.add(molecule)
                heavy[molecule] = int((numbers > 1).sum())
    return molecules, low, high, heavy


@pytest.mark.parametrize(
    "name,heavy_range,min_molecules,min_low,min_high",
    [
        ("qm-train.h5", (1, 4), 60, 2000, 500),
        ("qm-test.h5", (5, 7), 12, 100, 100),
    ],
)
def test_shipped_set_meets_its_targets_and_readme(name, heavy_range, min_molecules, min_low, min_high):
    molecules, low, high, heavy = contents(name)
    assert len(molecules) >= min_molecules and low >= min_low and high >= min_high
    assert all(heavy_range[0] <= n <= heavy_range[1] for n in heavy.values()), heavy
    readme = (ROOT / "data" / "README.md").read_text()
    row = re.search(rf"\| `{re.escape(name)}` \| (\d+) \| ([\d,]+) \| ([\d,]+) \|", readme)
    assert row, f"data/README.md has no COUNTS row for {name}"
    assert [int(x.replace(",", "")) for x in row.groups()] == [len(molecules), low, high]


def test_no_test_molecule_is_trained_on():
    assert not contents("qm-train.h5")[0] & contents("qm-test.h5")[0]


def test_ring_extension_list_meets_issue_16():
    """≥ 48 CHNO molecules of 3–6 heavy atoms, ≥ 24 with a 3- to 6-membered ring (aromatic
    five- and six-membered ones among them), none in test.smi or train.smi."""
    from rdkit import Chem

    from aniserve.qmdata.sampling import read_molecule_list

    def canonical(specs):
        return {Chem.MolToSmiles(Chem.MolFromSmiles(s.source)): s.name for s in specs}

    rings = canonical(read_molecule_list(ROOT / "data" / "molecules" / "train-rings.smi"))
    others = {
        **canonical(read_molecule_list(ROOT / "data" / "molecules" / "train.smi")),
        **canonical(read_molecule_list(ROOT / "data" / "molecules" / "test.smi")),
    }
    assert len(rings) >= 48 and not set(rings) & set(others)
    mols = [Chem.MolFromSmiles(s) for s in rings]
    assert all(3 <= m.GetNumHeavyAtoms() <= 6 and {a.GetSymbol() for a in m.GetAtoms()} <= set("CNO") for m in mols)
    ring_sizes = [{len(r) for r in m.GetRingInfo().AtomRings()} for m in mols]
    assert sum(bool(s) and s <= {3, 4, 5, 6} for s in ring_sizes) >= 24
    aromatic = [s for m, s in zip(mols, ring_sizes) if any(a.GetIsAromatic() for a in m.GetAtoms())]
    assert {5, 6} <= set().union(*aromatic)


def test_ring_extension_file_matches_the_readme():
    """The partial extension: what it holds is what data/README.md's COUNTS row says,
    and every molecule in it comes from its list, within 3–6 heavy atoms."""
    from aniserve.qmdata.sampling import read_molecule_list

    molecules, low, high, heavy = contents("qm-train-rings.h5")
    listed = {s.name for s in read_molecule_list(ROOT / "data" / "molecules" / "train-rings.smi")}
    assert molecules <= listed and all(3 <= n <= 6 for n in heavy.values())
    readme = (ROOT / "data" / "README.md").read_text()
    row = re.search(r"\| `qm-train-rings.h5` \| (\d+) of 56 \| ([\d,]+) of 896 \| ([\d,]+) of 224 \|", readme)
    assert row, "data/README.md has no COUNTS row for qm-train-rings.h5"
    assert [int(x.replace(",", "")) for x in row.groups()] == [len(molecules), low, high]
    assert not molecules & contents("qm-test.h5")[0]


@pytest.mark.parametrize("name,goal", [("qm-train.h5", 256), ("qm-test.h5", 30)])
def test_ccsd_t_forces_are_what_the_readme_says(name, goal):
    """Issue #32's coupled-cluster forces, computed session by session: every one finite,
    only where the CCSD(T) energy is, and counted in data/README.md as they stand."""
    count, molecules = 0, set()
    with h5py.File(ROOT / "data" / name, "r") as f:
        for group in f.values():
            if "ccsd(t)_ccpvdz.forces" not in group:
                continue
            have = np.isfinite(group["ccsd(t)_ccpvdz.forces"][()]).all(axis=(1, 2))
            assert np.all(np.isfinite(group[HIGH][()])[have]), "CCSD(T) forces only where its energy is"
            count += int(have.sum())
            molecules |= {m.decode() for m, h in zip(group["molecule"][()], have) if h}
    readme = (ROOT / "data" / "README.md").read_text()
    row = re.search(rf"\| `{re.escape(name)}` CCSD\(T\) forces \| ([\d,]+) of {goal} \| (\d+) molecules \|", readme)
    assert row, f"data/README.md has no CCSD(T) forces row for {name}"
    assert [int(x.replace(",", "")) for x in row.groups()] == [count, len(molecules)]
