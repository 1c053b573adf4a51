"""The compiled CPU kernels (aniserve/kernels) against the tensor operations they
replace: the same AEVs, gradients and network outputs, every order of derivative still
exact, and a clean fallback when no compiler is at hand."""

import warnings

import numpy as np
import pytest
import torch
from conftest import ETHANOL_NUMBERS, ETHANOL_POSITIONS, cached_model

from aniserve import kernels
from aniserve.bench.speed import water_box
from aniserve.neighbors import find_pairs
from aniserve.networks import EnsembleMLP

pytestmark = pytest.mark.weights  # the official ANI weights (see conftest)


def structures():
    """(label, numbers, positions (N, 3), cell or None): a molecule, a periodic box with
    enough pairs to split across threads, and a molecule with an isolated atom."""
    numbers, positions, cell = water_box(4)
    lone = np.array([*ETHANOL_POSITIONS, [30.0, 0.0, 0.0]])
    return [
        ("ethanol", ETHANOL_NUMBERS, np.array(ETHANOL_POSITIONS), None),
        ("water box", numbers, positions, cell),
        ("ethanol + lone N", [*ETHANOL_NUMBERS, 7], lone, None),
    ]


def pair_vectors(model, numbers, positions, cell, dtype):
    pos = torch.tensor(positions, dtype=torch.float64)
    cell_t = None if cell is None else torch.tensor(cell, dtype=torch.float64)
    pairs = find_pairs(pos, model.cutoff + 0.5, cell_t)  # with a skin: pairs beyond the cutoff are ignored
    vectors = pos[pairs.neighbor] - pos[pairs.center]
    if pairs.shift is not None:
        vectors = vectors + pairs.shift @ cell_t
    return model.species_indices(torch.tensor(numbers)), pairs, vectors.to(dtype)


@pytest.mark.parametrize("name", ["ani-1ccx", "ani-2x"])
def test_aev_kernel_equals_tensor_version(name):
    model = cached_model(name, "float64")
    featurizer = model.featurizer
    for label, numbers, positions, cell in structures():
        species, pairs, vectors = pair_vectors(model, numbers, positions, cell, torch.float64)
        grad_out = torch.randn(
            len(species), featurizer.output_width, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
        )
        results = []
        for forward in (featurizer.forward, featurizer.tensor_forward):
            v = vectors.clone().requires_grad_(True)
            aev = forward(species, pairs.center, pairs.neighbor, v)
            results.append((aev, *torch.autograd.grad(aev, v, grad_out)))
        assert results[0][0].grad_fn.name().endswith("_AEVKernelBackward"), label
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-14, msg=label)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-11, atol=1e-12, msg=label)


def test_aev_kernel_in_float32_is_as_accurate_as_the_tensor_version():
    """Against float64, the kernel's float32 AEVs and gradients err no more than the
    tensor version's float32 ones (within a factor for rounding luck)."""
    exact, single = cached_model("ani-1ccx", "float64").featurizer, cached_model("ani-1ccx", "float32").featurizer
    _, numbers, positions, cell = structures()[1]
    species, pairs, vectors = pair_vectors(cached_model("ani-1ccx", "float64"), numbers, positions, cell, torch.float64)
    grad_out = torch.rand(len(species), exact.output_width, dtype=torch.float64)
    v = vectors.clone().requires_grad_(True)
    reference = exact.tensor_forward(species, pairs.center, pairs.neighbor, v)
    (reference_grad,) = torch.autograd.grad(reference, v, grad_out)
    errors = []
    for forward in (single.forward, single.tensor_forward):
        v = vectors.float().requires_grad_(True)
        aev = forward(species, pairs.center, pairs.neighbor, v)
        (grad,) = torch.autograd.grad(aev, v, grad_out.float())
        errors.append(
            ((aev.double() - reference).abs().max().item(), (grad.double() - reference_grad).abs().max().item())
        )
    (aev_kernel, grad_kernel), (aev_tensor, grad_tensor) = errors
    assert aev_kernel < 1e-5 and grad_kernel < 1e-4
    assert aev_kernel <= 2 * aev_tensor and grad_kernel <= 2 * grad_tensor


@pytest.mark.slow
def test_aev_kernel_gradients_of_every_order():
    """gradcheck of the kernel's written-out gradient; a second derivative (create_graph)
    differentiates the tensor version, so gradgradcheck holds too."""
    model = cached_model("ani-1ccx", "float64")
    species, pairs, vectors = pair_vectors(model, ETHANOL_NUMBERS, np.array(ETHANOL_POSITIONS), None, torch.float64)
    aev = lambda v: model.featurizer(species, pairs.center, pairs.neighbor, v)  # noqa: E731
    v = vectors.clone().requires_grad_(True)
    assert aev(v).grad_fn.name().endswith("_AEVKernelBackward")
    assert torch.autograd.gradcheck(aev, (v,))
    assert torch.autograd.gradgradcheck(aev, (v,))


def test_aev_kernel_splits_work_across_threads_without_changing_a_bit():
    model = cached_model("ani-1ccx", "float64")
    _, numbers, positions, cell = structures()[1]
    species, pairs, vectors = pair_vectors(model, numbers, positions, cell, torch.float64)
    assert len(pairs) > 2 * 256  # enough pairs for two threads
    grad_out = torch.rand(len(species), model.featurizer.output_width, dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            v = vectors.clone().requires_grad_(True)
            aev = model.featurizer(species, pairs.center, pairs.neighbor, v)
            results.append((aev, *torch.autograd.grad(aev, v, grad_out)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_frozen_networks_written_out_gradient_equals_autograd():
    """Frozen networks in eval mode run _FrozenNetworks (the compiled kernel here); trainable
    ones autograd's plain composition: same energies, same gradients, and a second
    derivative through the frozen path is autograd's."""
    torch.manual_seed(0)
    mlp = EnsembleMLP([12, 10, 8, 6, 1], ensemble_size=3).double()
    columns = torch.tensor([0, 2, 3, 5, 7, 11])
    features = torch.randn(5, len(columns), dtype=torch.float64) * 3
    weights = torch.rand(3, 5, dtype=torch.float64)

    def energies_gradient_hessian_diagonal():
        f = features.clone().requires_grad_(True)
        energies = mlp(f, columns)
        (gradient,) = torch.autograd.grad((energies * weights).sum(), f, retain_graph=True)
        (gradient_graph,) = torch.autograd.grad((energies * weights).sum(), f, create_graph=True)
        (hessian,) = torch.autograd.grad(gradient_graph.sum(), f)
        return energies, gradient, hessian

    mlp.requires_grad_(False).eval()
    assert mlp(features.clone().requires_grad_(True), columns).grad_fn.name().endswith("_FrozenNetworksBackward")
    frozen = energies_gradient_hessian_diagonal()
    mlp.requires_grad_(True)
    assert not mlp(features.clone().requires_grad_(True), columns).grad_fn.name().endswith("_FrozenNetworksBackward")
    plain = energies_gradient_hessian_diagonal()

    torch.testing.assert_close(frozen[0], plain[0], rtol=1e-13, atol=1e-14)
    # torch's own CELU derivative scales by 1/α rounded to float32, even in float64
    # (relative error ~1e-7 where z ≤ 0); the written-out one is exact.
    torch.testing.assert_close(frozen[1], plain[1], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(frozen[2], plain[2], rtol=1e-12, atol=1e-13)  # both autograd's
    mlp.requires_grad_(False)
    assert torch.autograd.gradcheck(
        lambda x: mlp(x, columns), (features.clone().requires_grad_(True),), atol=1e-8, rtol=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("sizes", [[240, 160, 128, 96, 1], [40, 24, 16, 1], [12, 10, 7, 1], [5, 1]])
def test_mlp_kernel_equals_the_tensor_versions(sizes, dtype, monkeypatch):
    """The compiled network (register blocks of 1 to 6 atoms, vector widths 8/16 or
    scalar remainders) against the tensor written-out path and autograd's plain one, for
    atom counts that fill blocks exactly, leave every remainder (50 leaves 2), or fill
    many blocks."""
    torch.manual_seed(1)
    mlp = EnsembleMLP(sizes, ensemble_size=3).to(dtype).requires_grad_(False).eval()
    columns = torch.arange(0, sizes[0], 2)[: max(1, sizes[0] // 2)] if sizes[0] > 8 else None
    width = sizes[0] if columns is None else len(columns)
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    for n in (1, 3, 4, 5, 6, 7, 50):
        features = torch.randn(n, width, dtype=dtype) * 2
        grad_out = torch.rand(3, n, dtype=dtype)
        results = []
        for compiled in ("on", "off"):
            kernels.use("compiled" if compiled == "on" else "tensor")
            f = features.clone().requires_grad_(True)
            energies = mlp(f, columns)
            results.append((energies, *torch.autograd.grad(energies, f, grad_out)))
        plain_f = features.clone().requires_grad_(True)
        plain = mlp.plain_forward(plain_f, columns)
        results.append((plain, *torch.autograd.grad(plain, plain_f, grad_out)))
        for energies, gradient in results[1:]:
            torch.testing.assert_close(results[0][0], energies, **tolerance)
            # (autograd's CELU derivative is off by ~1e-7 relative in float64, see above)
            torch.testing.assert_close(
                results[0][1], gradient, **(tolerance if dtype == torch.float32 else dict(rtol=1e-6, atol=1e-9))
            )
        torch.testing.assert_close(results[0][1], results[1][1], **tolerance)  # both written out


def test_evaluation_is_the_same_with_kernels_off(monkeypatch):
    model = cached_model("ani-1ccx", "float64")
    _, numbers, positions, cell = structures()[1]
    compiled = model.evaluate(numbers, positions, cell)
    kernels.use("tensor")
    assert kernels.library() is None
    tensor = model.evaluate(numbers, positions, cell)
    assert abs(compiled.energy - tensor.energy) < 1e-10
    np.testing.assert_allclose(compiled.forces, tensor.forces, atol=1e-10, rtol=0)
    np.testing.assert_allclose(compiled.strain_derivative, tensor.strain_derivative, atol=1e-9, rtol=0)


def test_without_a_compiler_one_warning_and_the_tensor_version(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels.backends, "_loaded", {})
    monkeypatch.setenv("ANISERVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="compiled CPU kernels unavailable"):
        assert kernels.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.library() is None  # warned once
        result = cached_model("ani-1ccx", "float64").evaluate(ETHANOL_NUMBERS, ETHANOL_POSITIONS)
    assert np.isfinite(result.energy)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_the_library_is_built_once_per_source_and_reused(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels.backends, "_loaded", {})
    monkeypatch.setenv("ANISERVE_CACHE", str(tmp_path))
    assert kernels.library() is not None
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(kernels.backends, "_loaded", {})
    assert kernels.library() is not None
    assert [p.stat().st_mtime_ns for p in (tmp_path / "kernels").iterdir()] == [stamp]


def test_neighbour_search_kernel_finds_the_same_pairs(monkeypatch):
    """The compiled search against the tensor one: the same (center, neighbour, image)
    set, sorted by center, for a large molecule (cell list, no images), triclinic boxes
    searched in bins of the cell itself (atoms inside, and scattered over many cells
    around it) and a cell shorter than the cutoff (an atom sees its own images)."""
    rng = np.random.default_rng(3)
    numbers, positions, cell = water_box(6)
    skew = np.array([[1.0, 0.0, 0.0], [0.3, 1.0, 0.0], [-0.2, 0.25, 1.0]])
    big = np.array([[17.0, 0.0, 0.0], [5.0, 16.5, 0.0], [-3.0, 4.0, 16.0]])
    cases = [
        (rng.uniform(0, 22, (400, 3)), None),
        (positions @ skew, cell @ skew),
        (rng.uniform(-3, 5, (300, 3)) @ big, big),
        (rng.uniform(0, 3, (5, 3)), np.array([[3.1, 0.0, 0.0], [0.7, 2.9, 0.0], [0.4, -0.6, 3.3]])),
    ]
    origin, lib = torch.zeros(1, 3, dtype=torch.float64), kernels.library()
    assert kernels.periodic_pairs(lib, origin, torch.tensor(big), 5.2) is not None  # three bins fit
    assert kernels.periodic_pairs(lib, origin, torch.eye(3) * 15, 5.2) is None  # two: images are built instead
    with pytest.raises(ValueError, match="too far outside the periodic cell"):
        kernels.periodic_pairs(lib, torch.tensor([[1e17, 0.0, 0.0]]), torch.tensor(big), 5.2)
    for positions, cell in cases:
        pos = torch.tensor(positions, dtype=torch.float64)
        cell_t = None if cell is None else torch.tensor(cell, dtype=torch.float64)
        found = []
        for compiled in ("on", "off"):
            kernels.use("compiled" if compiled == "on" else "tensor")
            pairs = find_pairs(pos, 5.2, cell_t)
            assert torch.all(pairs.center[1:] >= pairs.center[:-1])
            shift = torch.zeros(len(pairs), 3) if pairs.shift is None else pairs.shift
            found.append(sorted(zip(pairs.center.tolist(), pairs.neighbor.tolist(), map(tuple, shift.tolist()))))
        assert found[0] == found[1] and len(found[0]) > 0


def test_structures_without_pairs(monkeypatch):
    """A lone atom, and a periodic box whose atoms are all beyond each other's cutoff:
    the kernels see no pairs at all; energies equal the tensor path's, forces are zero."""
    model = cached_model("ani-1ccx", "float64")
    cases = [([8], [[0.0, 0.0, 0.0]], None), ([1, 6], [[0.0, 0.0, 0.0], [9.0, 9.0, 9.0]], np.eye(3) * 18.0)]
    for numbers, positions, cell in cases:
        results = []
        for compiled in ("on", "off"):
            kernels.use("compiled" if compiled == "on" else "tensor")
            results.append(model.evaluate(numbers, positions, cell))
        assert abs(results[0].energy - results[1].energy) < 1e-12
        assert np.all(results[0].forces == 0)


@pytest.mark.slow
def test_kernels_built_without_openmp_or_libmvec_give_the_same_results(monkeypatch, tmp_path):
    """The plainest build (what a compiler without OpenMP, or a glibc without libmvec,
    falls back to) compiles and computes the same numbers."""
    model = cached_model("ani-1ccx", "float64")
    _, numbers, positions, cell = structures()[1]
    kernels.use("tensor")
    tensor = model.evaluate(numbers, positions, cell)
    kernels.use("compiled")
    monkeypatch.setenv("ANISERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels.build, "_OPTIONAL", [[]])
    monkeypatch.setattr(kernels.backends, "_loaded", {})
    lib = kernels.library()
    assert lib is not None and str(tmp_path) in lib._name
    plain = model.evaluate(numbers, positions, cell)
    assert abs(plain.energy - tensor.energy) < 1e-10
    np.testing.assert_allclose(plain.forces, tensor.forces, atol=1e-10, rtol=0)
    np.testing.assert_allclose(plain.strain_derivative, tensor.strain_derivative, atol=1e-9, rtol=0)


def test_constants_struct_matches_the_c_side():
    """kernels.build.Constants mirrors aev.cpp's Constants by hand: same size, same offsets."""
    import ctypes

    lib = kernels.library()
    out = (ctypes.c_int64 * 16)()
    lib.aev_constants_layout(out)
    fields = [name for name, _ in kernels.build.Constants._fields_]
    assert len(fields) == 15
    assert out[0] == ctypes.sizeof(kernels.build.Constants)
    assert list(out[1:]) == [getattr(kernels.build.Constants, name).offset for name in fields]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_networks_sharing_a_first_layer_equal_the_sum_of_each(dtype):
    """A group of networks (a Δ model's base and correction) runs through one first layer
    holding theirs side by side; its energies and input gradients are those of the
    networks run one by one, added up, whatever their widths, depths and CELU α."""
    torch.manual_seed(2)
    base = EnsembleMLP([40, 24, 16, 1], ensemble_size=3, celu_alpha=0.1).to(dtype).requires_grad_(False).eval()
    correction = EnsembleMLP([40, 6, 1], ensemble_size=3, celu_alpha=0.3).to(dtype).requires_grad_(False).eval()
    lone = EnsembleMLP([40, 9, 1], ensemble_size=3).to(dtype).requires_grad_(False).eval()
    layers = [[net.frozen_layers(None).kernel() for net in group] for group in ([base, correction], [lone])]
    networks = kernels.MLPKernelNetworks(layers)
    assert [bool(f.weights) for f in networks.first] == [True, True, False]
    assert [(f.width, f.column) for f in networks.first[:2]] == [(30, 0), (30, 24)]
    features = torch.randn(13, 40, dtype=dtype)
    energies, gradients = kernels.mlp(kernels.library(), networks, features, [7, 6])
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    # The written-out tensor version, network by network (autograd's CELU derivative is
    # off by ~1e-7 relative in float64, see above), member by member.
    rows = {0: features[:7], 1: features[7:]}
    expected_energies, expected_gradients = [], []
    for g, group in enumerate(([base, correction], [lone])):
        energy, jacobian = 0, 0
        for net in group:
            frozen = net.frozen_layers(None)
            e, slopes = frozen.tensor_forward(rows[g])
            one_hot = [torch.zeros_like(e).index_fill_(0, torch.tensor([m]), 1) for m in range(3)]
            energy = energy + e
            jacobian = jacobian + torch.stack([frozen.tensor_backward(h, [s.clone() for s in slopes]) for h in one_hot])
        expected_energies.append(energy)
        expected_gradients.append(jacobian)
    torch.testing.assert_close(energies, torch.cat(expected_energies, dim=1), **tolerance)
    torch.testing.assert_close(gradients, torch.cat(expected_gradients, dim=1), **tolerance)


def test_a_shared_first_layer_out_of_place_is_refused():
    torch.manual_seed(3)
    nets = [EnsembleMLP([8, 5, 1], ensemble_size=2).requires_grad_(False).eval() for _ in range(2)]
    networks = kernels.MLPKernelNetworks([[net.frozen_layers(None).kernel() for net in nets]])
    networks.first[1].column = 6  # 6 + 5 columns do not fit in the 10 side by side
    with pytest.raises(ValueError, match="refused"):
        kernels.mlp(kernels.library(), networks, torch.randn(4, 8, dtype=torch.float64), [4])
