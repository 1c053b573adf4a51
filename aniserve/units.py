"""Every unit conversion factor aniserve uses, in one place.

Internal units are those of ANI: positions in Å, energies in Hartree, forces in
Hartree/Å.  The edges convert: i-PI speaks atomic units (Bohr, Hartree), ASE eV and Å.

The values are the CODATA 2014 constants exactly as ASE (``ase.units``, its default)
derives them in float64.  Matching ASE bit for bit matters: an energy of -4,000 eV
converted with CODATA 2018 instead differs by 3e-5 eV, which would show up when a
structure evaluated through ASE's socket is compared with one evaluated in-process.
"""

#: Bohr radius in Å.
BOHR_IN_ANGSTROM = 0.5291772105638411
ANGSTROM_IN_BOHR = 1.0 / BOHR_IN_ANGSTROM

#: Hartree in eV.
HARTREE_IN_EV = 27.211386024367243
EV_IN_HARTREE = 1.0 / HARTREE_IN_EV

#: Hartree in kcal/mol.
HARTREE_IN_KCAL_PER_MOL = 627.5094738898777

#: Boltzmann constant in Hartree per kelvin.
BOLTZMANN_HARTREE_PER_K = 3.1668105143562215e-06

#: Harmonic wavenumber (cm⁻¹) of a mass-weighted Hessian eigenvalue of 1 Hartree/(Å² amu):
#: √(Eh / (Å² u)) / (2π c), with ASE's CODATA 2014 Hartree, atomic mass unit and c.
WAVENUMBER_CM1_OF_HARTREE_PER_A2_AMU = 2720.228648898766
