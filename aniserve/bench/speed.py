"""``aniserve bench speed``: energy + forces cost per call, against system size.

Cases: single molecules (ethanol 9 atoms, n-hexane 20, n-tritriacontane 101), periodic
water boxes (density 1 g/cm³, random orientations) from 192 to 12,288 atoms, and a batch
of 8 and of 100 ethanols.  Each case is timed as the median of repeated full calls of
``ANIPotential.evaluate`` (neighbour search, featurizer, networks, autograd forces),
after warm-up, and again with a reused neighbour list (an MD step between rebuilds).  Peak
memory is the process's peak resident set size after the case.
"""

from __future__ import annotations

import logging
import math
import resource
import statistics
import time

import click
import numpy as np
import torch

from aniserve.bench import command as common

log = logging.getLogger(__name__)

ETHANOL = (
    [6, 6, 8, 1, 1, 1, 1, 1, 1],
    [
        [-0.9233, 0.0609, 0.0534],
        [0.5089, -0.4270, -0.0510],
        [1.3841, 0.6509, 0.1935],
        [-1.6032, -0.7930, -0.0236],
        [-1.1404, 0.6054, 0.9761],
        [-1.1287, 0.7369, -0.7813],
        [0.7264, -0.8873, -1.0212],
        [0.6614, -1.1906, 0.7186],
        [2.2747, 0.3176, 0.0937],
    ],
)


def alkane(carbons: int):
    """n-CnH(2n+2), all-trans zigzag with tetrahedral hydrogens (C–C 1.54 Å, C–H 1.09 Å)."""
    half = math.radians(109.5) / 2
    carbon = np.array([[i * 1.54 * math.sin(half), (i % 2) * 1.54 * math.cos(half), 0.0] for i in range(carbons)])
    numbers, positions = [6] * carbons, list(carbon)
    for i, c in enumerate(carbon):
        outward = np.array([0.0, -1.0 if i % 2 == 0 else 1.0, 0.0])
        for side in (-1, 1):
            direction = outward * math.cos(math.radians(54.75)) + np.array([0, 0, side * math.sin(math.radians(54.75))])
            positions.append(c + 1.09 * direction / np.linalg.norm(direction))
            numbers.append(1)
        for end, axis in ((0, -1), (carbons - 1, 1)):
            if i == end:
                positions.append(c + 1.09 * np.array([axis * math.sin(half), outward[1] * math.cos(half), 0.0]))
                numbers.append(1)
    return numbers, np.array(positions)


def water_box(per_side: int, seed: int = 0):
    """per_side³ water molecules on a cubic lattice at 1 g/cm³, randomly oriented."""
    spacing = (18.015 / 0.6022 / 1.0) ** (1 / 3)  # Å per molecule at 1 g/cm³
    rng = np.random.default_rng(seed)
    local = np.array(
        [
            [0.0, 0.0, 0.0],
            [0.9572, 0.0, 0.0],
            [0.9572 * math.cos(math.radians(104.52)), 0.9572 * math.sin(math.radians(104.52)), 0.0],
        ]
    )
    numbers, positions = [], []
    for index in np.ndindex(per_side, per_side, per_side):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        positions.extend(local @ q.T + (np.array(index) + 0.5) * spacing)
        numbers.extend([8, 1, 1])
    return numbers, np.array(positions), np.eye(3) * per_side * spacing


def _time(call, repeats: int) -> float:
    for _ in range(max(2, repeats // 10)):  # warm-up
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cases(quick: bool):
    # Molecules take milliseconds: many calls make their medians steady.
    yield "ethanol", "molecule", 1, (*ETHANOL, None), 200
    yield "n-hexane", "molecule", 1, (*alkane(6), None), 200
    yield "n-C33H68", "molecule", 1, (*alkane(33), None), 100
    for n in (4, 6) if quick else (4, 6, 8, 12, 16):
        numbers, positions, cell = water_box(n)
        yield f"water box {n**3}", "periodic", 1, (numbers, positions, cell), (10 if n <= 8 else 3)
    rng = np.random.default_rng(0)
    # 8: one step of an 8-bead path-integral run, beads batched (the i-PI benchmark's case)
    for count, repeats in ((8, 200), (100, 10)):
        numbers = np.array([ETHANOL[0]] * count)
        positions = np.array(ETHANOL[1])[None] + rng.normal(0, 0.02, (count, 9, 3))
        yield f"{count} ethanols (batch)", "batch", count, (numbers, positions, None), repeats


def run(model, quick: bool = False, torchani_model=None, agreement=None, skin: float = 1.0) -> list[dict]:
    """Time every case.  ``ms_per_call`` is a cold call (neighbour search included);
    ``ms_per_md_step`` reuses a neighbour list with ``skin``, as an MD step does between
    rebuilds (single structures only).  With ``torchani_model``, ``agreement`` is
    (aniserve model, TorchANI runner), both float64, for the energy check."""
    from aniserve.bench.floor import gemm_gflops, network_bytes, network_flops, read_gbps
    from aniserve.neighbors import NeighborList

    rows = []
    gflops = gemm_gflops(model.dtype) if model.device.type == "cpu" else None
    gbps = read_gbps() if model.device.type == "cpu" else None
    for name, kind, count, (numbers, positions, cell), repeats in cases(quick):
        atoms = int(np.size(numbers))
        if quick:
            repeats = min(repeats, 3)
        seconds = _time(lambda: model.evaluate(numbers, positions, cell), repeats)
        row = {
            "case": name,
            "kind": kind,
            "atoms": atoms,
            "structures": count,
            "ms_per_call": seconds * 1e3,
            "atoms_per_s": atoms / seconds,
        }
        if gflops:
            flops = network_flops(model, numbers)
            row.update(
                network_mflop=flops / 1e6,
                gemm_gflops=gflops,
                floor_ms=flops / gflops / 1e6,
                fraction_of_floor=flops / gflops / 1e9 / seconds,
            )
        if gbps:
            weights = network_bytes(model, numbers)
            row.update(network_mb=weights / 1e6, read_gbps=gbps, memory_floor_ms=weights / gbps / 1e6)
        line = f"{name:22s} {atoms:6d} atoms  {seconds * 1e3:9.2f} ms  {atoms / seconds:9.0f} atoms/s"
        if kind != "batch":
            pairs = [
                NeighborList(model.cutoff, skin).pairs(
                    torch.as_tensor(np.asarray(positions, dtype=np.float64)),
                    None if cell is None else torch.as_tensor(cell),
                )
            ]
            step = _time(lambda: model.evaluate(numbers, positions, cell, pairs=pairs), repeats)
            row.update(ms_per_md_step=step * 1e3, md_atoms_per_s=atoms / step)
            line += f"  reused list {step * 1e3:9.2f} ms {atoms / step:9.0f} atoms/s"
        row["peak_rss_mb"] = _peak_rss_mb()
        if torchani_model is not None:
            ref = _time(lambda: torchani_model(numbers, positions, cell), repeats)
            model64, torchani64 = agreement
            diff = _energy_agreement(model64, torchani64, numbers, positions, cell)
            row.update(
                torchani_ms_per_call=ref * 1e3,
                speedup_vs_torchani=ref / seconds,
                torchani_float64_energy_diff_hartree=diff,
            )
            line += f"  TorchANI {ref * 1e3:9.2f} ms ({ref / seconds:.1f}×; float64 |ΔE| {diff:.1e} Ha)"
        log.info(line)
        rows.append(row)
    return rows


def _energy_agreement(model64, torchani64, numbers, positions, cell) -> float:
    """Largest |E_aniserve − E_TorchANI| (Hartree), both in float64, with the two codes'
    isolated-atom energies made equal: TorchANI's NeuroChem loader rounds self energies
    to float32 (−3.2e-6 Ha per O, −1.9e-6 per C), which alone moves a 192-atom water
    box by 2e-4 Ha.  What remains is any difference in the AEVs or networks.
    """
    numbers = np.asarray(numbers)
    ours = np.asarray(model64.evaluate(numbers, positions, cell).energy)
    theirs = np.asarray(torchani64(numbers, positions, cell))
    atom = {
        int(z): float(torchani64([z], [[0.0, 0.0, 0.0]], None)) - float(model64.evaluate([z], [[0.0, 0.0, 0.0]]).energy)
        for z in np.unique(numbers)
        if z > 0
    }
    offset = np.vectorize(lambda z: atom.get(int(z), 0.0))(numbers).sum(-1)
    return float(np.max(np.abs(ours + offset - theirs)))


def scaling(rows: list[dict]) -> dict:
    """Cost per atom of the largest water box relative to the 1,536-atom box (1.0 =
    linear), for cold calls and for MD steps with a reused neighbour list."""
    boxes = {r["atoms"]: r for r in rows if r["kind"] == "periodic"}
    if 1536 not in boxes or max(boxes) <= 1536:
        return {}
    big, base = boxes[max(boxes)], boxes[1536]
    return {
        "from_atoms": 1536,
        "to_atoms": big["atoms"],
        "per_atom_cost_ratio": (big["ms_per_call"] / big["atoms"]) / (base["ms_per_call"] / 1536),
        "per_atom_md_step_cost_ratio": (big["ms_per_md_step"] / big["atoms"]) / (base["ms_per_md_step"] / 1536),
    }


def torchani_runner(model_name: str, dtype: torch.dtype):
    """TorchANI on the same NeuroChem weights, energy + forces, for --compare-torchani."""
    import pathlib

    import torchani

    from aniserve.models import load_model

    source = pathlib.Path(load_model(model_name).description["source"])
    info = source if source.suffix == ".info" else next(source.glob("*.info"))
    # TorchANI resolves the files an .info names under $TORCHANI_DATA_DIR/Neurochem.
    import os
    import tempfile

    folder = pathlib.Path(tempfile.mkdtemp(prefix="aniserve-torchani-"))
    (folder / "Neurochem").symlink_to(info.parent.resolve())
    os.environ["TORCHANI_DATA_DIR"] = str(folder)
    reference = torchani.neurochem.load_model_from_info_file(info).to(dtype)

    def call(numbers, positions, cell):
        species = torch.as_tensor(np.asarray(numbers)).reshape(-1, np.shape(numbers)[-1])
        coords = torch.as_tensor(np.asarray(positions), dtype=dtype).reshape(len(species), -1, 3).requires_grad_(True)
        if cell is None:
            energy = reference((species, coords)).energies
        else:
            c = torch.as_tensor(cell, dtype=dtype)
            pbc = torch.tensor([True, True, True])
            # TorchANI's periodic search expects atoms inside the cell (its documented usage).
            inside = torchani.utils.map_to_central(coords, c, pbc)
            energy = reference((species, inside), cell=c, pbc=pbc).energies
        torch.autograd.grad(energy.sum(), coords)
        return energy.detach().double().numpy().reshape(np.shape(numbers)[:-1])

    return call


def plot(result: dict, path) -> None:
    """Time per call and atoms per second against system size, titled with the model,
    dtype, threads and kernels the figures are for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["cases"]
    fig, (ax, rate) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, marker in (("molecule", "o"), ("periodic", "s"), ("batch", "^")):
        sel = [r for r in rows if r["kind"] == kind]
        if sel:
            ax.loglog([r["atoms"] for r in sel], [r["ms_per_call"] for r in sel], marker, label=f"aniserve, {kind}")
            rate.semilogx([r["atoms"] for r in sel], [r["atoms_per_s"] for r in sel], marker, label=f"aniserve, {kind}")
        ref = [r for r in sel if "torchani_ms_per_call" in r]
        if ref:
            ax.loglog(
                [r["atoms"] for r in ref],
                [r["torchani_ms_per_call"] for r in ref],
                marker,
                mfc="none",
                label=f"TorchANI, {kind}",
            )
            rate.semilogx(
                [r["atoms"] for r in ref],
                [r["atoms"] / r["torchani_ms_per_call"] * 1e3 for r in ref],
                marker,
                mfc="none",
                label=f"TorchANI, {kind}",
            )
    boxes = [r for r in rows if r["kind"] == "periodic"]
    if boxes:
        x = np.array([r["atoms"] for r in boxes])
        md = np.array([r.get("ms_per_md_step", np.nan) for r in boxes])
        ax.loglog(x, md, "s", mfc="none", mec="C1", label="aniserve, periodic, MD step (list reused)")
        ax.loglog(x, md[-1] * x / x[-1], "k:", label="linear")
    ax.set_xlabel("atoms")
    ax.set_ylabel("ms per energy+forces call")
    rate.set_xlabel("atoms")
    rate.set_ylabel("atoms per second (energy+forces)")
    ax.legend(fontsize=8)
    rate.legend(fontsize=8)
    fig.suptitle(
        f"aniserve bench speed: {result['model']}, {result['dtype']}, {result['threads']} threads, "
        f"{result['kernels']}{' (--quick: 3-call medians)' if result.get('quick') else ''}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(result: dict, compare_torchani: bool = False) -> str:
    """The printed table of ``aniserve bench speed``."""
    lines = [
        f"{'case':22s} {'atoms':>6s} {'ms/call':>9s} {'atoms/s':>9s} {'MD step ms':>10s} {'atoms/s':>9s} "
        f"{'floor ms':>9s} {'of floor':>8s} {'memory floor ms':>15s} {'peak RSS MB':>11s}"
        + ("  TorchANI ms  speed-up  float64 |ΔE| Ha" if compare_torchani else "")
    ]
    for r in result["cases"]:
        md = f"{r['ms_per_md_step']:10.2f} {r['md_atoms_per_s']:9.0f}" if "ms_per_md_step" in r else f"{'':10s} {'':9s}"
        floor = f"{r['floor_ms']:9.2f} {100 * r['fraction_of_floor']:7.0f}%" if "floor_ms" in r else f"{'':9s} {'':8s}"
        memory = f"{r['memory_floor_ms']:15.3f}" if "memory_floor_ms" in r else f"{'':15s}"
        lines.append(
            f"{r['case']:22s} {r['atoms']:6d} {r['ms_per_call']:9.2f} {r['atoms_per_s']:9.0f} {md} "
            f"{floor} {memory} {r['peak_rss_mb']:11.0f}"
            + (
                f"  {r['torchani_ms_per_call']:11.2f}  {r['speedup_vs_torchani']:7.1f}×  "
                f"{r['torchani_float64_energy_diff_hartree']:.1e}"
                if compare_torchani
                else ""
            )
        )
    if result["scaling"]:
        s = result["scaling"]
        lines.append(
            f"cost per atom at {s['to_atoms']} atoms / at {s['from_atoms']}: {s['per_atom_cost_ratio']:.2f} "
            f"cold, {s['per_atom_md_step_cost_ratio']:.2f} per MD step (1.00 = linear)"
        )
    # Each floor's footnote, with the rate it was measured at (one per run).
    footnotes = (
        (
            "gemm_gflops",
            "floor: the element networks' forward pass and input gradient (nonzero AEV columns only) at this "
            "machine's measured {:.0f} GFLOP/s matrix-multiply rate; 'of floor' = floor / measured (100% would "
            "be pure network arithmetic at that rate)",
        ),
        (
            "read_gbps",
            "memory floor: the networks' weights for the elements present read once from memory at this "
            "machine's measured {:.1f} GB/s (what a call pays when other work has left them out of the caches)",
        ),
    )
    for field, text in footnotes:
        rates = {r[field] for r in result["cases"] if field in r}
        if rates:
            lines.append(text.format(rates.pop()))
    return "\n".join(lines)


@click.command("speed")
@common.model_option
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--threads", default=None, type=int, help="torch threads (default: torch's choice).")
@click.option("--quick", is_flag=True, help="Fewer sizes and repeats (seconds, for tests).")
@click.option(
    "--kernels",
    type=click.Choice(["on", "off"]),
    default="on",
    show_default=True,
    help="Compiled CPU kernels, or tensor operations only (kernels.use('tensor'), as ANISERVE_KERNELS=off).",
)
@click.option("--compare-torchani", is_flag=True, help="Also time TorchANI (pip install torchani) on the same weights.")
@common.json_option("Write every case's figures (and the machine, threads, kernels used) as JSON.")
@common.plot_option("Write a PNG of time per call and atoms/s against system size.")
def command(model, device, dtype, threads, quick, kernels, compare_torchani, json_out, plot_out):
    """Energy+forces time per call: molecules of 9/20/101 atoms, water boxes up to 12,288 atoms, 100-molecule batch.

    Example: aniserve bench speed --model ani-1ccx --compare-torchani --json speed.json --plot speed.png
    """
    import os
    import platform

    from aniserve import kernels as compiled
    from aniserve.models import DTYPES, load_model

    if threads:
        torch.set_num_threads(threads)
    compiled.use("compiled" if kernels == "on" else "tensor")
    used = "compiled" if device == "cpu" and compiled.library() is not None else "tensor operations"
    click.echo(f"CPU kernels: {used}")
    potential = load_model(model, device=device, dtype=dtype)
    reference = agreement = None
    if compare_torchani:
        reference = torchani_runner(model, DTYPES[dtype])
        agreement = (load_model(model, device=device, dtype="float64"), torchani_runner(model, torch.float64))
    rows = run(potential, quick, reference, agreement)
    load = os.getloadavg()[0]
    result = {
        "model": model,
        "device": device,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "kernels": used,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "quick": quick,
        "load_average_1min": round(load, 2),
        "cases": rows,
        "scaling": scaling(rows),
    }
    if quick:
        click.echo("note: --quick times each case as the median of 3 calls: a smoke test, not a measurement", err=True)
    if load > 0.5 * (os.cpu_count() or 1):
        click.echo(
            f"warning: the machine is busy (load {load:.1f} on {os.cpu_count()} cores): these times include "
            f"waiting for the CPU",
            err=True,
        )
    common.finish(result, table(result, compare_torchani), json_out, plot_out, plot)
