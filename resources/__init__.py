"""External systems behind Dagster resources: the warehouse, the object store,
the imagery and footprint sources, and the model store. Assets talk to these,
never to a file path or a database client directly, so the environment switch
(`orchestration.environment`) can swap the embedded default for production."""
