{#-
  One row per building with, for each declared attribute (var('attribute_models'), passed by
  the pipeline from models/attributes.yaml), the prediction of its latest model version for
  that building: the model_version with the most recent predicted_at (ties broken by
  model_version), whatever its status. Classification and segmentation give <name>_label and
  <name>_score, a regression <name>_value; every attribute <name>_status, _model_version and
  _predicted_at. An attribute whose declaration was removed keeps its columns (filled from the
  predictions still in the warehouse): removing a declaration removes nothing already written.
  A partition run (var('departement')) rebuilds that département's rows only.
-#}
{{ config(
    partition_by=bativision.mart_partition_by() if target.type == 'bigquery' else none,
    partitions=bativision.mart_partitions() if target.type == 'bigquery' else none,
) }}
{%- set declared = bativision.attribute_specs() -%}
{%- set declared_names = declared | map(attribute='name') | list -%}
{%- set attributes = declared -%}
{%- for kept in bativision.attributes_in(this if is_incremental() else none) if kept.name not in declared_names -%}
    {%- do attributes.append(kept) -%}
{%- endfor -%}
{%- set attribute_models = attributes | map(attribute='name') | list -%}

with

buildings as (

    select * from {{ ref('stg_buildings') }}
    where {{ bativision.in_partition() }}

),

latest_attribute_predictions as (

    select
        building_id,
        model_name,
        model_version,
        label,
        score,
        value,
        prediction_status,
        predicted_at

    from {{ ref('stg_predictions') }}

    where {{ bativision.in_partition() }}
    {% if attribute_models | length > 0 -%}
    and model_name in {{ bativision.sql_string_list(attribute_models) }}
    {%- else -%}
    and 1 = 0
    {%- endif %}

    qualify row_number() over (
        partition by building_id, model_name
        order by predicted_at desc, model_version desc
    ) = 1

)

select
    buildings.building_id,
    buildings.departement,
    {{ bativision.departement_key('buildings.departement') }} as departement_key,
    buildings.cell_id,
    buildings.geometry,
    buildings.geometry_wkt,
    buildings.centroid_lon,
    buildings.centroid_lat,
    buildings.geometry_status,
    buildings.area_m2,
    buildings.height_m,
    buildings.usage,
    buildings.source
    {%- for attribute in attributes %}
    {%- set name = attribute.name %},
    {% if attribute.task == 'regression' -%}
    {{ name }}_prediction.value as {{ name }}_value,
    {%- else -%}
    {{ name }}_prediction.label as {{ name }}_label,
    {{ name }}_prediction.score as {{ name }}_score,
    {%- endif %}
    {{ name }}_prediction.prediction_status as {{ name }}_status,
    {{ name }}_prediction.model_version as {{ name }}_model_version,
    {{ name }}_prediction.predicted_at as {{ name }}_predicted_at
    {%- endfor %}

from buildings
{%- for name in attribute_models %}

left join latest_attribute_predictions as {{ name }}_prediction
    on {{ name }}_prediction.building_id = buildings.building_id
    and {{ name }}_prediction.model_name = '{{ name }}'
{%- endfor %}
