"""bench/_common.py: figures, their goals, the --json result and run-all's table (no benchmark runs)."""

import importlib.util
import json
import sys

from tests.support import ROOT


def _common():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "_common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_common"] = module  # dataclasses look the module up while building the class
    spec.loader.exec_module(module)
    return module


def test_goals_on_ratios_and_on_values():
    c = _common()
    fetch = c.figure("fetch", [5.0, 4.0, 9.0], [4.0, 3.9, 4.1], ratio_of="raw/ours", op=">=", limit=0.95)
    assert (fetch.ours, fetch.raw, round(fetch.ratio, 3), fetch.met) == (5.0, 4.0, 0.8, False)
    assert fetch.goal == "raw/ours ≥ 0.95"
    build = c.figure("build", [8.0, 8.2, 8.1], [8.0, 7.9, 8.1], op="<=", limit=1.03)
    assert build.met and build.goal == "ours/raw ≤ 1.03"
    cli = c.figure("invoke --list", [0.2, 0.3, 0.1], [0.05], ratio_of="", op="<=", limit=0.25)
    assert cli.ratio is None and cli.met and cli.goal == "≤ 0.25 s"
    data = c.figure("file data sent", 0, unit="B", ratio_of="", op="<=", limit=0)
    assert data.met and c.goal_line(data).endswith("met") and "0 B" in c.goal_line(data)
    assert c.goal_line(fetch).endswith("NOT met")


def test_json_result_round_trips_into_the_table():
    c = _common()
    figs = [c.figure("fetch 1.00 GiB dense vs rsync", 4.0, 3.6, ratio_of="raw/ours", op=">=", limit=0.95),
            c.figure("unchanged sync: file data sent", 0, unit="B", ratio_of="", op="<=", limit=0)]
    stdout = "noise a script printed\n" + json.dumps({"figures": [vars(f) for f in figs]}) + "\n"
    assert c.parse_result(stdout) == figs
    text = c.table([("fetch", figs[0]), ("sync", figs[1]), ("boot", "exit 1")])
    lines = text.splitlines()
    assert [col.strip() for col in lines[0].split(" | ")][:3] == ["bench", "figure", "ours"] and set(lines[1]) <= {"-", "+"}
    assert "4.000 s" in lines[2] and "3.600 s" in lines[2] and "0.900" in lines[2] and lines[2].endswith("NOT met")
    assert lines[3].endswith("met") and "0 B" in lines[3]
    assert lines[4].startswith("boot") and lines[4].endswith("FAILED")
    assert len({line.index("|") for line in lines if "|" in line}) == 1  # columns line up


def test_the_cpu_line_says_whether_there_are_sha_instructions():
    c = _common()
    epyc = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 aes avx2 sha_ni\n"
    xeon = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu sse2 aes avx2 avx512f\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd aes pmull sha1 sha2\nCPU part\t: 0xd0c\n"
    assert c.cpu_line(epyc, 2) == "CPU: AMD EPYC, 2 cores; SHA instructions: yes (sha_ni); AES instructions: yes"
    assert "SHA instructions: no;" in c.cpu_line(xeon, 2)
    assert "SHA instructions: yes (sha2)" in c.cpu_line(arm, 8)
