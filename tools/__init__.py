"""Commands around the project, run from the repository root: `python -m tools.bench` (speed),
`python -m tools.study` (the results), `python -m tools.tower` (the image path alone, supervised),
`python -m tools.prepare_coco` (the COCO download) and `tools/gpu_check.sh` (the first run on a
GPU)."""
