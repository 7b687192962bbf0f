"""The results tables in results/README.md and README.md are exactly what study.py makes of the
committed results."""

import json
from pathlib import Path

import pytest

from tools import study

REPO = Path(__file__).resolve().parents[1]


def test_readme_table_is_generated_from_the_results_json():
    results = json.loads((REPO / "results" / "study.json").read_text())
    for doc, text in study.tables(results).items():
        readme = (REPO / doc).read_text()
        assert study.update_readme(readme, text) == readme, doc
    # only planned runs are in the results, each once, and the seeded comparison is complete first
    done = [(r["name"], r["seed"]) for r in results["runs"]]
    planned = [(n, s) for n, s, _ in study.planned_runs()]
    assert len(set(done)) == len(done) and set(done) <= set(planned)
    assert set(planned[:len(done)]) == set(done)                     # runs go in plan order


def record(name, seed, rsum, wall):
    metrics = {key: float(seed) for key, _, _ in study.COLUMNS if key != "wall_s"}
    metrics["rsum"] = rsum
    return {"name": name, "seed": seed, "wall_s": wall, "metrics": metrics}


def test_table_shows_mean_and_sample_std_over_seeds():
    results = {"runs": [record("CLIP", 0, 100.0, 10), record("CLIP", 1, 110.0, 20),
                        record("CLIP", 2, 120.0, 30),
                        record("FDT softmax T=1", 0, 50.0, 7)]}
    lines = study.table(results).splitlines()
    # header, rule, chance, two rows in RUNS order
    assert len(lines) == 5
    clip = [c.strip() for c in lines[3].strip("|").split("|")]
    keys = [k for k, _, _ in study.COLUMNS]
    assert clip[:3] == ["CLIP", "3", "0 of 3"]
    # seeds 0, 1, 2: mean 110, sample std 10
    assert clip[3 + keys.index("rsum")] == "110.0 ± 10.0"
    assert clip[3 + keys.index("zs_shape")] == "1.0 ± 1.0"
    assert clip[-1] == "20.0 ± 10.0"                          # wall time
    softmax = [c.strip() for c in lines[4].strip("|").split("|")]
    assert softmax[:3] == ["FDT softmax T=1", "1", "0 of 1"]
    assert softmax[3 + keys.index("zs_shape")] == "0.0"
    assert softmax[3 + keys.index("rsum")] == "50.0" and softmax[-1] == "7.0"


def test_difference_row_is_fdt_minus_clip_with_its_standard_error():
    runs = [record("CLIP", s, 100.0 + 10 * s, 1) for s in range(3)] + \
           [record("CLIP+FDT", s, 130.0 + 20 * s, 1) for s in range(3)]
    diff = [c.strip() for c in study.table({"runs": runs}).splitlines()[-1].strip("|").split("|")]
    keys = [k for k, _, _ in study.COLUMNS]
    # means 110 and 150; variances 100 and 400 over 3 seeds each: s.e. sqrt(100 / 3 + 400 / 3)
    assert diff[3 + keys.index("rsum")] == f"+40.0 ± {(500 / 3) ** 0.5:.1f}"
    assert diff[3 + keys.index("zs_shape")] == "+0.0 ± 0.8"       # both 0, 1, 2: s.e. sqrt(2 / 3)


def test_a_run_meets_the_targets_when_it_reaches_every_one():
    runs = [record("CLIP+FDT", s, 500.0, 1) for s in range(3)]
    for run in runs:
        run["metrics"].update(study.TARGETS)                   # every target exactly reached
    runs[1]["metrics"]["bind_replace_shape"] -= 0.1            # one target missed by a little
    del runs[2]["metrics"]["zs_colour"]                        # one not measured
    lines = study.table({"runs": runs}).splitlines()
    assert [c.strip() for c in lines[3].strip("|").split("|")][:3] == ["CLIP+FDT", "3", "1 of 3"]
    # the README's table: the seeded pair and its columns only, the targets column kept
    short = study.table({"runs": runs}, study.SUMMARY, study.SEEDED).splitlines()
    header = [c.strip() for c in short[0].strip("|").split("|")]
    assert header == ["run", "seeds", "all targets"] + [h for k, h, _ in study.COLUMNS
                                                        if k in study.SUMMARY]
    assert len(short) == 4 and short[3].startswith("| CLIP+FDT | 3 | 1 of 3 |")


def test_update_readme_replaces_only_between_markers():
    text = f"intro\n{study.README_BEGIN}\nold table\n{study.README_END}\noutro\n"
    assert (study.update_readme(text, "NEW")
            == f"intro\n{study.README_BEGIN}\nNEW\n{study.README_END}\noutro\n")
    with pytest.raises(SystemExit, match="marker"):
        study.update_readme("no markers here", "NEW")
