{#-
  One row per (département, model_name, model_version) present in predictions: how the
  département's buildings were accounted for by that model version.
  A partition run (var('departement')) rebuilds that département's rows only.
-#}
{{ config(
    partition_by=bativision.mart_partition_by() if target.type == 'bigquery' else none,
    partitions=bativision.mart_partitions() if target.type == 'bigquery' else none,
) }}
{%- set statuses = ['ok', 'no_imagery', 'nodata', 'invalid_geometry', 'error'] -%}

with

buildings as (

    select * from {{ ref('stg_buildings') }}
    where {{ bativision.in_partition() }}

),

predictions as (

    select * from {{ ref('stg_predictions') }}
    where {{ bativision.in_partition() }}

),

buildings_per_departement as (

    select
        departement,
        count(*) as buildings

    from buildings
    group by departement

),

prediction_counts as (

    select
        predictions.departement,
        predictions.model_name,
        predictions.model_version,
        max(predictions.task) as task,
        count(*) as predicted,
        count(distinct predictions.building_id) as predicted_buildings,
        count(buildings.building_id) as matched_buildings,
        {%- for status in statuses %}
        cast(sum(case when predictions.prediction_status = '{{ status }}' then 1 else 0 end)
            as {{ dbt.type_bigint() }}) as n_{{ status }},
        {%- endfor %}
        avg(case when predictions.prediction_status = 'ok' then predictions.score end) as mean_score,
        avg(case when predictions.prediction_status = 'ok' then predictions.value end) as mean_value,
        min(predictions.predicted_at) as first_predicted_at,
        max(predictions.predicted_at) as last_predicted_at

    from predictions
    left join buildings
        on buildings.building_id = predictions.building_id
        and buildings.departement = predictions.departement
    group by
        predictions.departement,
        predictions.model_name,
        predictions.model_version

),

label_counts as (

    select
        departement,
        model_name,
        model_version,
        label,
        count(*) as n_label

    from predictions
    where prediction_status = 'ok'
        and label is not null
    group by
        departement,
        model_name,
        model_version,
        label

),

label_distributions as (

    select
        departement,
        model_name,
        model_version,
        {{ dbt.concat([
            "'{'",
            dbt.listagg(
                dbt.concat([
                    bativision.json_quote('label'),
                    "': '",
                    "cast(n_label as " ~ dbt.type_string() ~ ")",
                ]),
                "', '",
                "order by label",
            ),
            "'}'",
        ]) }} as label_distribution

    from label_counts
    group by
        departement,
        model_name,
        model_version

)

select
    prediction_counts.departement,
    {{ bativision.departement_key('prediction_counts.departement') }} as departement_key,
    prediction_counts.model_name,
    prediction_counts.model_version,
    prediction_counts.task,
    coalesce(buildings_per_departement.buildings, 0) as buildings,
    prediction_counts.predicted,
    prediction_counts.predicted_buildings,
    prediction_counts.matched_buildings,
    {%- for status in statuses %}
    prediction_counts.n_{{ status }},
    {%- endfor %}
    cast(prediction_counts.n_ok as {{ bativision.type_double() }})
        / nullif(coalesce(buildings_per_departement.buildings, 0), 0) as coverage,
    coalesce(label_distributions.label_distribution, '{}') as label_distribution,
    prediction_counts.mean_score,
    prediction_counts.mean_value,
    prediction_counts.first_predicted_at,
    prediction_counts.last_predicted_at

from prediction_counts

left join buildings_per_departement
    on buildings_per_departement.departement = prediction_counts.departement

left join label_distributions
    on label_distributions.departement = prediction_counts.departement
    and label_distributions.model_name = prediction_counts.model_name
    and label_distributions.model_version = prediction_counts.model_version
