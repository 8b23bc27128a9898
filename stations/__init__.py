"""Stations: one module per alloy stage type, run in the part's child process.

Each exposes `run_stage(ctx: factory.stages.StageContext) -> StageResult`
and is registered under the `forge_factory.stages` entry-point group in
pyproject.toml. Shared pieces: `base` (where a stage's input model is, where
its outputs go), `loader` (executes the load plan), `corpus` (calibration and
eval text).
"""
