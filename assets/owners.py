"""Who answers for each asset (Dagster ``owners``): shown in the UI, used to route alerts."""

PIPELINE = ["team:data-engineering"]  # inputs, buildings, mosaic, chips: the imagery pipeline
ML = ["team:machine-learning"]  # the models and their predictions
ANALYTICS = ["team:analytics"]  # the dbt models analysts read
