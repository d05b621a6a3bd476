"""trackflow: learned tractography (Learn2track, TractoTransformer) for whole cohorts."""

__version__ = "0.1.0"
