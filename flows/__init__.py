"""Prefect flows of the seapig-core pipeline; they only wire the tasks in ``tasks/``.

- :func:`flows.calibration.calibration_flow`: calibration logits -> selector bundle + artifacts;
- :func:`flows.scoring.scoring_flow`: bundle + query batches -> selections Parquet + artifacts;
- :func:`flows.demo.demo_flow`: both on the bundled digits example (``python -m flows.demo``).
"""
