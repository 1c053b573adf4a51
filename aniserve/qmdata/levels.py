"""Levels of theory, computed with PySCF.

A level is written ``METHOD/BASIS``: ``hf``, any PySCF exchange-correlation name
(``wb97x``, ``b3lyp``, …) for restricted Kohn–Sham, or ``ccsd(t)`` (frozen core, on an
RHF reference).  Every level gives energies and, when asked, forces: HF and DFT by their
analytic gradients, CCSD(T) by PySCF's analytic CCSD(T) gradient, whose Λ amplitudes
must be the (T)-corrected ones (``ccsd_t_lambda``; the plain CCSD Λ gives a gradient
that is not the derivative of the CCSD(T) energy, off by ~1e-3 Ha/bohr on water).  DFT
uses density fitting when asked (recorded with every record), PySCF's default grid.
"""

from __future__ import annotations

import dataclasses
import re
import time

import numpy as np

from aniserve.units import BOHR_IN_ANGSTROM


@dataclasses.dataclass(frozen=True)
class Level:
    method: str  # 'hf', an XC functional name, or 'ccsd(t)'
    basis: str
    density_fit: bool = False

    @classmethod
    def parse(cls, text: str, density_fit: bool = False) -> Level:
        if text.count("/") != 1:
            raise ValueError(f"level {text!r}: write it as METHOD/BASIS, e.g. wb97x/6-31g*")
        method, basis = (t.strip().lower() for t in text.split("/"))
        return cls(method, basis, density_fit and method not in ("ccsd(t)",))

    @property
    def key(self) -> str:
        """Property-key prefix in the HDF5 files: ``wb97x_631gd``, ``ccsd(t)_ccpvdz``."""
        basis = self.basis.replace("*", "d").replace("+", "p")
        return f"{self.method}_{re.sub(r'[^a-z0-9()]', '', basis)}"

    def attributes(self) -> dict:
        import pyscf

        return {
            "method": self.method,
            "basis": self.basis,
            "density_fitting": self.density_fit,
            "program": f"PySCF {pyscf.__version__}",
            "reference": "RHF" if self.method in ("hf", "ccsd(t)") else "RKS",
            "frozen_core": self.method == "ccsd(t)",
        }


def compute(level: Level, numbers: np.ndarray, positions: np.ndarray, forces: bool = True) -> dict:
    """Energy (Hartree), forces (Hartree/Å; None when not asked for) and wall time (s)
    of one structure."""
    from pyscf import cc, dft, gto, scf

    start = time.perf_counter()
    mol = gto.M(
        atom=[(int(z), tuple(map(float, p))) for z, p in zip(numbers, positions)],
        basis=level.basis,
        unit="Angstrom",
        charge=0,
        spin=0,
        verbose=0,
    )
    if level.method in ("hf", "ccsd(t)"):
        mf = scf.RHF(mol)
    else:
        mf = dft.RKS(mol, xc=level.method)
    if level.density_fit:
        mf = mf.density_fit()
    mf.conv_tol = 1e-10
    mf.kernel()
    if not mf.converged:
        raise RuntimeError(f"{level.key}: SCF did not converge")
    gradient = None
    if level.method == "ccsd(t)":
        coupled = cc.CCSD(mf).set_frozen()
        coupled.kernel()
        if not coupled.converged:
            raise RuntimeError(f"{level.key}: CCSD did not converge")
        energy = coupled.e_tot + coupled.ccsd_t()
        if forces:
            gradient = -_ccsd_t_gradient(coupled) / BOHR_IN_ANGSTROM
    else:
        energy = mf.e_tot
        if forces:
            gradient = -mf.nuc_grad_method().kernel() / BOHR_IN_ANGSTROM
    return {"energy": float(energy), "forces": gradient, "wall_s": time.perf_counter() - start}


#: Iterations allowed to the (T) Λ equations.  PySCF's default of 50 left two distorted
#: glyoxal conformations unconverged; a converged Λ is what the gradient needs, and
#: more iterations cost only time (each is a fraction of the CCSD step).
LAMBDA_MAX_CYCLE = 200


def _ccsd_t_gradient(coupled) -> np.ndarray:
    """Analytic CCSD(T) nuclear gradient (Hartree/bohr) of a converged (frozen-core) CCSD."""
    from pyscf.cc import ccsd_t_lambda
    from pyscf.grad import ccsd_t as ccsd_t_grad

    eris = coupled.ao2mo()
    converged, l1, l2 = ccsd_t_lambda.kernel(
        coupled, eris, coupled.t1, coupled.t2, max_cycle=LAMBDA_MAX_CYCLE, verbose=0
    )
    if not converged:
        raise RuntimeError(f"CCSD(T) lambda equations did not converge in {LAMBDA_MAX_CYCLE} iterations")
    return ccsd_t_grad.Gradients(coupled).kernel(coupled.t1, coupled.t2, l1, l2, eris=eris)
