"""The attributes the product ships: their names, tasks and classes, read once from ``models/attributes.yaml``.

The shipped declarations file (not a deployment's own, ``BATIVISION_ATTRIBUTES``):
the sample generator draws these classes, the demo prints these models, the
capacity plan costs them. Names are what the model store, the ``predictions``
rows (``model_name``) and the dbt columns use.
"""

from __future__ import annotations

from ops.ml.attributes import DEFAULT_PATH, Attribute, load_attributes

SHIPPED: dict[str, Attribute] = load_attributes(DEFAULT_PATH)

ROOF_TYPE = "roof_type"
ROOF_CLASSES: tuple[str, ...] = SHIPPED[ROOF_TYPE].classes

SOLAR_PANELS = "solar_panels"
PANEL_CLASSES: tuple[str, ...] = SHIPPED[SOLAR_PANELS].classes

#: Every shipped attribute's model, in declaration order: name → task.
MODELS: dict[str, str] = {name: a.task for name, a in SHIPPED.items()}
