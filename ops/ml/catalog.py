"""The models the product ships: their names, tasks and classes, defined once.

Names are what the model store, the ``predictions`` rows (``model_name``),
the dbt models and the demo use; classes are what the training assets learn
and the model cards record.
"""

from __future__ import annotations

ROOF_TYPE = "roof_type"
ROOF_CLASSES: tuple[str, ...] = ("flat", "gable", "hip")

SOLAR_PANELS = "solar_panels"
PANEL_CLASSES: tuple[str, ...] = ("none", "solar_panel")

#: Every shipped model, in the order predictions and summaries list them: name → task.
MODELS: dict[str, str] = {ROOF_TYPE: "classification", SOLAR_PANELS: "segmentation"}
