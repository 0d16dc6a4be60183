#!/usr/bin/env python3
"""Helpers for scripts/bench.sh: read fio's JSON output, find the loopfuse daemon's PID,
and turn the results file into a stdout table, BENCHMARKS.md and a PNG plot.

The results file has one tab-separated record per line. Its first field is the kind:
  meta KEY VALUE                 facts about the machine and the run
  target ID LABEL SETUP          a target, in column order, and how it is set up
  workload KEY GROUP LABEL UNIT BETTER COMMAND PLOT_LABEL
                                 GROUP is fio, time, latency, memory or space.
                                 BETTER is higher or lower. "|" in PLOT_LABEL starts
                                 a new line.
  value TARGET KEY RUN NUMBER    one measurement
  fail TARGET KEY REASON         why TARGET has no value for KEY (a short cell text)
  note TEXT                      an observation for the notes section
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict

UNIT_TEXT = {
    "read_mibps": "MiB/s",
    "write_mibps": "MiB/s",
    "read_iops": "IOPS",
    "write_iops": "IOPS",
    "s": "s",
    "ms": "ms",
    "MiB": "MiB",
}

# Bar colors of the plot, by target, so that a target has the same color in both panels.
TARGET_COLORS = {
    "raw": "#7f7f7f",
    "loop": "#1f77b4",
    "qsd": "#ff7f0e",
    "loopfuse": "#2ca02c",
    "loopfuse-writeback": "#006400",
    "loopfuse-offset": "#98df8a",
    "loopfuse-p1": "#17becf",
}


def fio_value(path, metric):
    """Print METRIC (read_mibps, write_mibps, read_iops or write_iops) of fio's JSON file."""
    with open(path, encoding="utf-8") as file:
        text = file.read()
    # fio writes some notes (e.g. about iodepth) into the output file before the JSON.
    start = text.find("{")
    if start < 0:
        raise SystemExit(f"{path}: no JSON object in fio's output")
    data, _ = json.JSONDecoder().raw_decode(text[start:])
    job = data["jobs"][0]
    if job.get("error"):
        raise SystemExit(f"{path}: fio job failed with error {job['error']}")
    direction, kind = metric.split("_")
    stats = job[direction]
    value = stats["bw_bytes"] / 2**20 if kind == "mibps" else stats["iops"]
    if value <= 0:
        raise SystemExit(f"{path}: fio reported no {direction} I/O")
    print(f"{value:.3f}")


def strip_deleted(path):
    """Return a /proc symlink target without the " (deleted)" that a replaced file gets."""
    suffix = " (deleted)"
    return path[: -len(suffix)] if path.endswith(suffix) else path


def pid_from_list(list_path, device, image):
    """Return the pid of the attachment in `loopfuse list --json` output that names
    DEVICE, its directory or IMAGE, or None."""
    try:
        with open(list_path, encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError):
        return None

    entries = []

    def collect(node):
        if isinstance(node, dict):
            if "pid" in node:
                entries.append(node)
            for child in node.values():
                collect(child)
        elif isinstance(node, list):
            for child in node:
                collect(child)

    collect(data)
    expected = {device, os.path.dirname(device), image, os.path.realpath(image)}
    for entry in entries:
        strings = {value for value in entry.values() if isinstance(value, str)}
        strings |= {os.path.realpath(value) for value in strings if value.startswith("/")}
        if strings & expected and isinstance(entry["pid"], int):
            return entry["pid"]
    return None


def pid_from_proc(exe, image):
    """Return the PID of a process running EXE that has IMAGE open or mapped, or None."""
    exe = os.path.realpath(exe)
    image = os.path.realpath(image)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if strip_deleted(os.readlink(f"/proc/{name}/exe")) != exe:
                continue
            fd_dir = f"/proc/{name}/fd"
            targets = {strip_deleted(os.readlink(f"{fd_dir}/{fd}")) for fd in os.listdir(fd_dir)}
            with open(f"/proc/{name}/maps", encoding="utf-8") as maps:
                targets |= {strip_deleted(line.split(maxsplit=5)[-1].strip())
                            for line in maps if line.count(" ") >= 5}
        except OSError:
            continue
        if image in targets:
            return int(name)
    return None


def find_pid(args):
    pid = pid_from_list(args.list_json, args.device, args.image)
    if pid is None:
        pid = pid_from_proc(args.exe, args.image)
    if pid is None:
        raise SystemExit(f"no loopfuse process found for {args.device} ({args.image})")
    print(pid)


class Results:
    """The parsed results file."""

    def __init__(self, path):
        self.meta = {}
        self.targets = []
        self.target_label = {}
        self.target_setup = {}
        self.workloads = []
        self.values = defaultdict(list)
        self.failures = {}
        self.notes = []
        with open(path, encoding="utf-8") as file:
            for line in file:
                self._add(line.rstrip("\n").split("\t"))

    def _add(self, fields):
        kind = fields[0]
        if kind == "meta":
            self.meta[fields[1]] = fields[2]
        elif kind == "target":
            self.targets.append(fields[1])
            self.target_label[fields[1]] = fields[2]
            self.target_setup[fields[1]] = fields[3]
        elif kind == "workload":
            key, group, label, unit, better, command, plot_label = fields[1:8]
            self.workloads.append(dict(key=key, group=group, label=label, unit=unit,
                                       better=better, command=command,
                                       plot_label=plot_label))
        elif kind == "value":
            self.values[(fields[1], fields[2])].append(float(fields[4]))
        elif kind == "fail":
            self.failures.setdefault((fields[1], fields[2]), fields[3])
        elif kind == "note":
            self.notes.append(fields[1])

    def median(self, target, key):
        values = self.values.get((target, key))
        return statistics.median(values) if values else None

    def cell(self, target, key, unit):
        """Return the median as text with its unit, or why there is none."""
        median = self.median(target, key)
        if median is None:
            return self.failures.get((target, key), "n/a")
        return format_value(median, unit)

    def ratio(self, target, key, reference):
        """Return median(target) / median(reference), or None."""
        value = self.median(target, key)
        base = self.median(reference, key)
        if value is None or not base:
            return None
        return value / base

    def ratio_cell(self, target, key, reference):
        ratio = self.ratio(target, key, reference)
        if ratio is not None:
            return format_ratio(ratio)
        if self.median(target, key) is None:
            return self.failures.get((target, key), "n/a")
        return "n/a"

    def group(self, *names):
        return [w for w in self.workloads if w["group"] in names]

    def measured_targets(self, keys):
        """Return the targets with a value or a failure for any of KEYS, in column order."""
        return [t for t in self.targets
                if any((t, k) in self.values or (t, k) in self.failures for k in keys)]


def plural(count, noun):
    return f"{count} {noun}" if count == "1" else f"{count} {noun}s"


def format_value(value, unit):
    if unit in ("read_iops", "write_iops"):
        return f"{value / 1000:.1f}k IOPS" if value >= 1000 else f"{value:.0f} IOPS"
    if unit in ("read_mibps", "write_mibps"):
        return f"{value:.0f} MiB/s" if value >= 100 else f"{value:.1f} MiB/s"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "ms":
        return f"{value:.1f} ms"
    return f"{value:.1f} {UNIT_TEXT.get(unit, unit)}"


def format_ratio(ratio):
    return f"{ratio:.3f}x" if ratio < 0.1 else f"{ratio:.2f}x"


def row_label(workload):
    if workload["unit"] in ("s", "ms"):
        return f"{workload['label']} (time)"
    return workload["label"]


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header, rows):
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    lines = []
    for row in [header] + rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def comparison_rows(results, workloads, targets, cell):
    return [[row_label(w)] + [cell(t, w) for t in targets] for w in workloads]


def build_tables(results):
    """Return (title, header, rows) for each table of the report."""
    targets = results.targets
    main = results.group("fio", "time")
    tables = [
        (f"Medians of {plural(results.meta.get('runs', '?'), 'run')}", ["workload"] + targets,
         comparison_rows(results, main, targets,
                         lambda t, w: results.cell(t, w["key"], w["unit"]))),
        ("Ratio to the raw image file (throughput: higher is better; time: lower is better)",
         ["workload"] + targets,
         comparison_rows(results, main, targets,
                         lambda t, w: results.ratio_cell(t, w["key"], "raw"))),
        ("Ratio to the kernel loop device (throughput: higher is better; time: lower is better)",
         ["workload"] + targets,
         comparison_rows(results, main, targets,
                         lambda t, w: results.ratio_cell(t, w["key"], "loop"))),
    ]

    latency = results.group("latency")
    latency_targets = results.measured_targets([w["key"] for w in latency])
    reps = results.meta.get("latency_reps", "?")
    tables.append((f"Attach and detach latency, median of {reps}", ["operation"] + latency_targets,
                   comparison_rows(results, latency, latency_targets,
                                   lambda t, w: results.cell(t, w["key"], w["unit"]))))

    memory = results.group("memory")
    memory_targets = results.measured_targets([w["key"] for w in memory])
    tables.append(("Daemon memory", ["measure"] + memory_targets,
                   comparison_rows(results, memory, memory_targets,
                                   lambda t, w: results.cell(t, w["key"], w["unit"]))))

    space = results.group("space")
    space_targets = results.measured_targets([w["key"] for w in space])
    tables.append(("Blocks allocated in the sparse image", ["image"] + space_targets,
                   comparison_rows(results, space, space_targets,
                                   lambda t, w: results.cell(t, w["key"], w["unit"]))))
    return tables


def print_summary(results, tables):
    quick = " (BENCH_QUICK=1: small sizes, 1 short run; not for comparison)" \
        if results.meta.get("quick") == "1" else ""
    print(f"loopfuse benchmarks, {results.meta.get('date', '')}{quick}")
    for title, header, rows in tables:
        print()
        print(title)
        print(text_table(header, rows))
    if results.notes:
        print()
        print(f"{len(results.notes)} note(s) in BENCHMARKS.md, among them:")
        for note in results.notes[:5]:
            print(f"- {note[:200]}")


def write_markdown(results, tables, path, plot_name):
    meta = results.meta
    quick = meta.get("quick") == "1"
    out = ["# Benchmarks", ""]
    if quick:
        out += ["**Quick mode (`BENCH_QUICK=1`): small image, one short run per workload. "
                "These numbers only show that the harness works; do not compare them.**", ""]
    out += [
        f"Written by `scripts/bench.sh` on {meta.get('date', '?')}; every run rewrites this page.",
        "",
        "Command:",
        "",
        "```",
        meta.get("command", "scripts/bench.sh"),
        "```",
        "",
        "## Machine",
        "",
        markdown_table(["what", "value"], [
            ["CPUs (`nproc`)", f"{meta.get('cpus', '?')} ({meta.get('cpu_model', '?')})"],
            ["memory", meta.get("memory", "?")],
            ["kernel (`uname -r`)", meta.get("kernel", "?")],
            ["scratch directory filesystem", meta.get("scratch_fs", "?")],
            ["fio", meta.get("fio", "?")],
            ["qemu-storage-daemon", meta.get("qsd", "?")],
            ["e2fsprogs", meta.get("e2fsprogs", "?")],
            ["loopfuse", meta.get("loopfuse", "not built")],
            ["run as root", meta.get("root", "?")],
        ]),
        "",
        "## Method",
        "",
        f"- Each fio workload runs on a {meta.get('image_mib', '?')} MiB image whose every "
        "byte was written with random data before the targets run.",
        "- Before each target: `sync` and `echo 3 > /proc/sys/vm/drop_caches` (root only), "
        "then the device file is opened and held open, and read once from start to end "
        "with `dd bs=1M`. All fio workloads of that target then run while it is held open, "
        "so the rand read workloads read data read before.",
        f"- Every fio workload runs {plural(meta.get('runs', '?'), 'time')} for "
        f"{meta.get('runtime', '?')} s (`--time_based`), with `sync` before each run. "
        "The tables show the median. `--invalidate=0` keeps fio from dropping the cache "
        "that the warm-up read filled.",
        "- `rand write 4 KiB, 1 job, fio and server on CPU 0` is the same workload with "
        "fio started with `--cpus_allowed=0` and every thread of the loopfuse daemon or of "
        "qemu-storage-daemon moved to CPU 0 (`taskset -a -p -c 0 PID`) for those runs only. "
        "Then no request or reply has to wake the other CPU, which shows what such wake-ups "
        "cost the FUSE targets on this machine.",
        "- Ratios divide a target's median by the raw file's or the kernel loop device's "
        "median from this same run. For throughput, higher is better; for times, "
        "lower is better.",
        f"- mkfs: a fresh sparse {meta.get('mkfs_mib', '?')} MiB image per target; caches "
        "dropped, then the source tree read once, so that each run copies it from the page "
        "cache. Each run times `mkfs.ext4 -F -q -d` and then `e2fsck -fn` (which must exit 0).",
        "- Attach latency runs from the start of the attach command until the device file "
        "has a non-zero size and its first 4 KiB can be read; detach latency runs until "
        "the detach command returns (qemu-storage-daemon: from SIGTERM until the process "
        "exits). A sparse 1 GiB image is used.",
        f"- Memory: `RssAnon` from `/proc/PID/status` of the loopfuse daemon serving a "
        f"{meta.get('rss_image_gib', '?')} GiB sparse image, right after attach and after "
        "`mkfs.ext4 -F -q` on the device. The PID comes from `loopfuse list --json`. "
        "qemu-storage-daemon is not measured there: with its default `discard=ignore`, "
        "mkfs.ext4 through its FUSE export allocates every block of the image.",
        "- Blocks allocated: `stat -c %b` of the image after the mkfs runs, which shows "
        "whether discards reach the image as holes.",
        "",
        "Targets (IMAGE is the image file, DEVICE the path that fio, mkfs and e2fsck use):",
        "",
        markdown_table(["target", "what", "setup"],
                       [[t, results.target_label[t], f"`{results.target_setup[t]}`"]
                        for t in results.targets]),
        "",
        "fio command lines (DEVICE is replaced by the target's path):",
        "",
        markdown_table(["workload", "command"],
                       [[w["label"], f"`{w['command']}`"] for w in results.group("fio")]),
        "",
        "Other commands:",
        "",
        markdown_table(["measure", "command"],
                       [[w["label"], f"`{w['command']}`"]
                        for w in results.group("time", "latency", "memory", "space")]),
        "",
        "## Results",
        "",
    ]
    for title, header, rows in tables:
        out += [f"### {title}", "", markdown_table(header, rows), ""]
    if plot_name:
        out += ["### Plot", "",
                "Speed relative to the raw file and to the kernel loop device, on a log scale. "
                "Times are inverted for the plot (reference time / target time), so higher "
                "is better everywhere.", "", f"![ratios]({plot_name})", ""]
    out += ["## Notes", ""]
    out += [f"- {note}" for note in results.notes] or ["- none"]
    out.append("")
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n".join(out))


def speed_ratio(results, target, workload, reference):
    """Return the ratio with higher meaning faster, or None."""
    ratio = results.ratio(target, workload["key"], reference)
    if ratio is None or ratio <= 0:
        return None
    return 1 / ratio if workload["better"] == "lower" else ratio


def write_plot(results, plot_path, work_dir):
    """Draw the ratios with gnuplot. Return False when gnuplot is missing or fails."""
    gnuplot = shutil.which("gnuplot")
    if gnuplot is None:
        results.notes.append("gnuplot is missing, so no plot was drawn")
        return False
    workloads = results.group("fio", "time")
    panels = []
    for reference, title in (("raw", "raw image file"), ("loop", "kernel loop device")):
        targets = [t for t in results.targets if t != reference]
        data_path = os.path.join(work_dir, f"plot-{reference}.dat")
        with open(data_path, "w", encoding="utf-8") as data:
            data.write("workload\t" + "\t".join(f'"{t}"' for t in targets) + "\n")
            for workload in workloads:
                label = workload["plot_label"].replace("|", "\\n")
                cells = []
                for target in targets:
                    ratio = speed_ratio(results, target, workload, reference)
                    cells.append("NaN" if ratio is None else f"{ratio:.4f}")
                data.write(f'"{label}"\t' + "\t".join(cells) + "\n")
        panels.append((data_path, title, targets))

    lines = [
        "set terminal pngcairo size 1400,1100 font 'sans,11' noenhanced",
        f"set output '{plot_path}'",
        "set multiplot layout 2,1",
        "set style data histogram",
        "set style histogram cluster gap 1",
        "set style fill solid 0.9 border -1",
        "set boxwidth 0.9",
        "set datafile missing 'NaN'",
        "set logscale y",
        "set yrange [0.005:20]",
        "set ytics ('0.01x' 0.01, '0.1x' 0.1, '0.5x' 0.5, '1x' 1, '2x' 2, '10x' 10)",
        "set grid ytics",
        "set key outside right top vertical",
        "set xtics nomirror",
        "set bmargin 4",
        "set arrow 1 from graph 0, first 1 to graph 1, first 1 nohead dashtype 2 linewidth 2",
    ]
    for data_path, title, targets in panels:
        lines.append(f"set title 'Speed relative to the {title} (higher is better; "
                     "times inverted)'")
        plots = [f"'{data_path}' using {i + 2}:xtic(1) title columnheader({i + 2}) "
                 f"linecolor rgb '{TARGET_COLORS.get(t, '#000000')}'"
                 for i, t in enumerate(targets)]
        lines.append("plot " + ", ".join(plots))
    lines.append("unset multiplot")
    script_path = os.path.join(work_dir, "plot.gp")
    with open(script_path, "w", encoding="utf-8") as script:
        script.write("\n".join(lines) + "\n")
    completed = subprocess.run([gnuplot, script_path], capture_output=True, text=True,
                               check=False)
    if completed.returncode != 0:
        results.notes.append(f"gnuplot failed: {completed.stderr.strip()[:300]}")
        return False
    return True


def report(args):
    results = Results(args.results)
    tables = build_tables(results)
    plotted = write_plot(results, args.plot, args.plot_dir)
    write_markdown(results, tables, args.markdown,
                   os.path.basename(args.plot) if plotted else None)
    print_summary(results, tables)
    print()
    print(f"Wrote {args.markdown}" + (f" and {args.plot}" if plotted else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    value = commands.add_parser("fio-value", help="print one metric of a fio JSON file")
    value.add_argument("json")
    value.add_argument("metric", choices=["read_mibps", "write_mibps", "read_iops", "write_iops"])

    pid = commands.add_parser("find-pid", help="print the PID of the loopfuse daemon of a device")
    pid.add_argument("--list-json", required=True, help="output of `loopfuse list --json`")
    pid.add_argument("--device", required=True)
    pid.add_argument("--image", required=True)
    pid.add_argument("--exe", required=True, help="the loopfuse binary")

    rep = commands.add_parser("report", help="write the stdout table, Markdown and plot")
    rep.add_argument("--results", required=True)
    rep.add_argument("--markdown", required=True)
    rep.add_argument("--plot", required=True, help="PNG file to write")
    rep.add_argument("--plot-dir", required=True, help="directory for gnuplot's input files")

    args = parser.parse_args()
    if args.command == "fio-value":
        fio_value(args.json, args.metric)
    elif args.command == "find-pid":
        find_pid(args)
    else:
        report(args)


if __name__ == "__main__":
    sys.exit(main())
