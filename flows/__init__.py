"""Prefect flows: the online `iterative-dpo` pipeline, the offline flows, and the stage flows for scale-out."""
