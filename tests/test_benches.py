"""The serving benchmarks run end to end and write the JSON they document (figures are
reported, never asserted: these machines are noisy)."""

import json

import pytest
import torch
from click.testing import CliRunner

from aniserve.cli import main


def run(tmp_path, *args):
    out = tmp_path / "out.json"
    result = CliRunner().invoke(main, ["bench", *args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    return result.output, json.loads(out.read_text())


@pytest.mark.slow
def test_bench_serve_reports_both_rates(tmp_path):
    output, report = run(tmp_path, "serve", "--connections", "1,4", "--seconds", "0.5", "--repeat", "2")
    assert [c["connections"] for c in report["cases"]] == [1, 4]
    assert all(c["driver_atoms_per_s"] > 0 and c["in_process_atoms_per_s"] > 0 for c in report["cases"])
    for case in report["cases"]:  # medians of the repeats, each repeat's ratio its own pair's
        samples = case["samples"]
        assert len(samples) == 2 and all(
            s["driver_to_in_process"] == s["driver_atoms_per_s"] / s["in_process_atoms_per_s"] for s in samples
        )
        assert case["driver_to_in_process_range"] == sorted(s["driver_to_in_process"] for s in samples)
        assert case["driver_atoms_per_s"] == sum(s["driver_atoms_per_s"] for s in samples) / 2
    assert "driver atoms/s" in output and "medians over repeats" in output


@pytest.mark.slow
def test_bench_ase_compares_unix_and_inet(tmp_path):
    output, report = run(tmp_path, "ase", "--calls", "5")
    assert [r["client"] for r in report["rows"]] == ["in-process", "socket-unix", "socket-inet"]
    assert all(r["ms_per_call_median"] > 0 for r in report["rows"]) and "× UNIX" in output


def test_bench_speed_quick(tmp_path):
    output, report = run(tmp_path, "speed", "--quick")
    assert report["cases"] and all(c["ms_per_call"] > 0 for c in report["cases"]) and "ms/call" in output
    # each case against its arithmetic floor (aniserve.bench.floor): a fraction, reported, never asserted
    assert all(c["floor_ms"] > 0 and c["fraction_of_floor"] > 0 for c in report["cases"]) and "of floor" in output
    # and against the memory floor: the weights it reads at the measured read rate
    for c in report["cases"]:
        assert c["memory_floor_ms"] == pytest.approx(c["network_mb"] / c["read_gbps"])
    assert "memory floor" in output


@pytest.mark.slow
def test_bench_ipi_repeats_and_summarises():
    """Real i-PI runs (2 and 4 steps), the harmonic driver, i-PI alone, aniserve batched
    and aniserve inside i-PI, twice: each ratio is taken against the harmonic run of its
    own repeat, each overhead also against i-PI alone."""
    from aniserve.bench import ipi

    kinds = ("harmonic", "ipi-alone", "aniserve-batched", "aniserve-in-ipi")
    rows = ipi.run("aniserve-1x-ccsdt", 2, 4, kinds=kinds, latencies=(1e-3,), repeats=2)
    assert [(r["repeat"], r["client"]) for r in rows] == [(repeat, kind) for repeat in (0, 1) for kind in kinds]
    for r in rows:
        if r["client"] in ("aniserve-batched", "aniserve-in-ipi"):
            alone = next(h for h in rows if h["client"] == "ipi-alone" and h["repeat"] == r["repeat"])
            assert r["over_ipi_alone_ms"] == pytest.approx(r["ms_per_step"] - alone["ms_per_step"])
            assert r["over_ipi_alone_to_in_process"] == pytest.approx(r["over_ipi_alone_ms"] / r["in_process_ms"])
        else:
            assert "over_ipi_alone_ms" not in r
    for r in rows:
        harmonic = next(h for h in rows if h["client"] == "harmonic" and h["repeat"] == r["repeat"])
        assert r["ratio_to_harmonic"] == pytest.approx(r["ms_per_step"] / harmonic["ms_per_step"])
    batched = next(s for s in ipi.summary(rows) if s["client"] == "aniserve-batched")
    ratios = sorted(r["ratio_to_harmonic"] for r in rows if r["client"] == "aniserve-batched")
    assert batched["repeats"] == 2 and batched["ratio_range"] == ratios
    assert batched["ratio_median"] == pytest.approx(sum(ratios) / 2)
    assert "× harmonic median (range)" in ipi.table(rows)
    # the client's share of a step against the same 8 beads evaluated in-process
    for r in rows:
        assert r["in_process_ms"] > 0
        if r["client"] not in ("harmonic", "ipi-alone"):
            harmonic = next(h for h in rows if h["client"] == "harmonic" and h["repeat"] == r["repeat"])
            assert r["over_harmonic_ms"] == pytest.approx(r["ms_per_step"] - harmonic["ms_per_step"])
            assert r["over_harmonic_to_in_process"] == pytest.approx(r["over_harmonic_ms"] / r["in_process_ms"])
    assert len(batched["over_harmonic_to_in_process_range"]) == 2 and "÷ in-process" in ipi.table(rows)


@pytest.mark.slow
def test_bench_speed_plot_says_what_it_measured(tmp_path):
    """The PNG has both panels (ms per call and atoms/s, as --help promises) and a title
    naming model, dtype, threads and kernels; --quick says it is a smoke test."""
    png = tmp_path / "speed.png"
    output, report = run(tmp_path, "speed", "--quick", "--plot", str(png))
    assert report["quick"] is True and report["load_average_1min"] >= 0
    assert "a smoke test, not a measurement" in output
    from PIL import Image

    width, height = Image.open(png).size
    assert width > 1.5 * height  # two panels side by side


@pytest.mark.weights
def test_the_floor_counts_the_networks_arithmetic_of_a_case():
    """Ethanol with ANI-1x: 240 of the 384 AEV columns can be nonzero for C, H, O; per atom
    and member a forward pass and an input gradient of 2·Σ in·out each (≈ 19 MFLOP, as
    issue #31 counts); the Δ default adds its correction networks."""
    import aniserve
    from aniserve.bench.floor import gemm_gflops, network_flops

    model = aniserve.load_model("ani-1x")
    species = model.species_indices(torch.tensor([6, 1, 8]))
    assert len(model.featurizer.nonzero_columns(tuple(sorted(species.tolist())))) == 240
    expected = 0
    for z, count in ((6, 2), (1, 6), (8, 1)):
        sizes = [240, *model.networks.mlps[model.elements.index({6: "C", 1: "H", 8: "O"}[z])].sizes[1:]]
        expected += 2 * 2 * sum(a * b for a, b in zip(sizes, sizes[1:])) * 8 * count
    assert network_flops(model, [6, 6, 8, 1, 1, 1, 1, 1, 1]) == expected
    assert 18e6 < expected < 21e6
    default = aniserve.load_model()
    assert network_flops(default, [6, 6, 8, 1, 1, 1, 1, 1, 1]) > expected
    rate = gemm_gflops(seconds=0.05)  # a measured rate: reported by bench speed, only checked to be a rate here
    assert rate > 0 and rate != float("inf")


@pytest.mark.weights
def test_the_memory_floor_counts_the_weights_a_case_reads():
    """Ethanol with ANI-1x reads each element's weights and biases once, the first layer
    over the 240 columns C, H and O can fill, for 8 members in float32: ≈ 6 MB, whatever
    the atom count; a Δ model reads its corrections as well; a float64 model twice as
    many bytes."""
    import aniserve
    from aniserve.bench.floor import network_bytes, read_gbps

    model = aniserve.load_model("ani-1x")
    expected = 0
    for element in ("C", "H", "O"):
        sizes = [240, *model.networks.mlps[model.elements.index(element)].sizes[1:]]
        expected += sum(a * b + b for a, b in zip(sizes, sizes[1:])) * 8 * 4
    ethanol = [6, 6, 8, 1, 1, 1, 1, 1, 1]
    assert network_bytes(model, ethanol) == expected and 5.5e6 < expected < 6.5e6
    assert network_bytes(model, [ethanol] * 8) == expected
    assert network_bytes(aniserve.load_model("ani-1x", dtype="float64"), ethanol) == 2 * expected
    assert network_bytes(aniserve.load_model(), ethanol) > expected
    rate = read_gbps(megabytes=64)  # a measured rate: reported by bench speed, only checked to be a rate here
    assert rate > 0 and rate != float("inf")
