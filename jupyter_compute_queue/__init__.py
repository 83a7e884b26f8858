"""Public compute queues for notebooks: container jobs from Jupyter, run by anyone's workers."""

__version__ = "0.1.0"
