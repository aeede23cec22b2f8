"""Studies: a grid of runs from one YAML file, run by one driver on a local or a Ray executor.

``spec`` reads a study file into cells with deterministic ids; ``driver`` plans the work, hands it to an
executor and is the only writer of the cells' run directories; ``worker`` edits and scores a task's
cases with one model kept loaded; ``executors`` registers the ways to run workers (in this process, or
Ray actors on this machine or a cluster); ``tables`` turns finished cells into tables with intervals.
"""

from overtone.study.spec import Cell, ModelSpec, Study, StudyError, load_study

__all__ = ["Cell", "ModelSpec", "Study", "StudyError", "load_study"]
