{#-
  Accounting invariant, building by building: for every département and (model_name,
  model_version) present in predictions, predictions holds exactly one row for every
  buildings row of that département, and no other row.
  Returns one row per violation with its kind: missing (a building without a prediction
  row), duplicated (a building with several rows), unexpected (a row whose building is
  not a building of that département, or has no building_id).
  A partition run (var('departement')) checks that département only.
-#}

with

buildings as (

    select building_id, departement from {{ ref('stg_buildings') }}
    where {{ bativision.in_partition() }}

),

predictions as (

    select building_id, departement, model_name, model_version from {{ ref('stg_predictions') }}
    where {{ bativision.in_partition() }}

),

model_versions as (

    select distinct departement, model_name, model_version from predictions

),

expected as (

    select
        model_versions.departement,
        model_versions.model_name,
        model_versions.model_version,
        buildings.building_id

    from model_versions
    inner join buildings
        on buildings.departement = model_versions.departement

),

actual as (

    select
        departement,
        model_name,
        model_version,
        building_id,
        count(*) as n_rows

    from predictions
    group by
        departement,
        model_name,
        model_version,
        building_id

)

select
    coalesce(expected.departement, actual.departement) as departement,
    coalesce(expected.model_name, actual.model_name) as model_name,
    coalesce(expected.model_version, actual.model_version) as model_version,
    coalesce(expected.building_id, actual.building_id) as building_id,
    coalesce(actual.n_rows, 0) as n_prediction_rows,
    case
        when actual.n_rows is null then 'missing'
        when expected.building_id is null then 'unexpected'
        else 'duplicated'
    end as violation

from expected
full outer join actual
    on actual.departement = expected.departement
    and actual.model_name = expected.model_name
    and actual.model_version = expected.model_version
    and actual.building_id = expected.building_id

where actual.n_rows is null
    or expected.building_id is null
    or actual.n_rows > 1
