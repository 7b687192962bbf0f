"""Course material: `python -m course.assign` hands out assignments (assignments.py lists them)
and grades them with the project's own tests."""
