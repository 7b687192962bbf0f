"""The README's results table is exactly what study.py makes of the committed results file."""

import json
from pathlib import Path

import pytest

import study

REPO = Path(__file__).resolve().parents[1]


def test_readme_table_is_generated_from_the_results_json():
    results = json.loads((REPO / "results" / "study.json").read_text())
    readme = (REPO / "README.md").read_text()
    assert study.update_readme(readme, study.table(results)) == readme
    # every planned run is in the results, so the table has all of them
    assert {(r["name"], r["seed"]) for r in results["runs"]} == {(n, s) for n, s, _ in study.planned_runs()}


def record(name, seed, rsum, wall):
    metrics = {key: float(seed) for key, _ in study.COLUMNS if key != "wall_s"}
    metrics["rsum"] = rsum
    return {"name": name, "seed": seed, "wall_s": wall, "metrics": metrics}


def test_table_shows_mean_and_sample_std_over_seeds():
    results = {"runs": [record("CLIP", 0, 100.0, 10), record("CLIP", 1, 110.0, 20), record("CLIP", 2, 120.0, 30),
                        record("FDT softmax", 0, 50.0, 7)]}
    lines = study.table(results).splitlines()
    assert len(lines) == 4                                     # header, rule, two rows in RUNS order
    clip = [c.strip() for c in lines[2].strip("|").split("|")]
    assert clip[:2] == ["CLIP", "3"]
    assert clip[2] == "1.0 ± 1.0"                             # seeds 0, 1, 2: mean 1, sample std 1
    assert clip[2 + [k for k, _ in study.COLUMNS].index("rsum")] == "110.0 ± 10.0"
    assert clip[-1] == "20.0 ± 10.0"                          # wall time
    softmax = [c.strip() for c in lines[3].strip("|").split("|")]
    assert softmax[:3] == ["FDT softmax", "1", "0.0"] and softmax[-1] == "7.0"


def test_update_readme_replaces_only_between_markers():
    text = f"intro\n{study.README_BEGIN}\nold table\n{study.README_END}\noutro\n"
    assert study.update_readme(text, "NEW") == f"intro\n{study.README_BEGIN}\nNEW\n{study.README_END}\noutro\n"
    with pytest.raises(SystemExit, match="marker"):
        study.update_readme("no markers here", "NEW")
