"""Quantum-chemistry reference data: conformer sampling and PySCF calculations.

Needs the optional extra ``aniserve[qm]`` (PySCF and RDKit).  Nothing here is
imported by the rest of aniserve.
"""
