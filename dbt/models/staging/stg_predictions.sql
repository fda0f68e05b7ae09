with

source as (

    select * from {{ source('warehouse', 'predictions') }}

),

renamed as (

    select
        -- ids
        {{ dbt.concat(["building_id", "'|'", "model_name", "'|'", "model_version"]) }} as prediction_id,
        cast(building_id as {{ dbt.type_string() }}) as building_id,
        cast(departement as {{ dbt.type_string() }}) as departement,
        cast(model_name as {{ dbt.type_string() }}) as model_name,
        cast(model_version as {{ dbt.type_string() }}) as model_version,
        cast(run_id as {{ dbt.type_string() }}) as run_id,
        cast(imagery_id as {{ dbt.type_string() }}) as imagery_id,

        -- outcome
        cast(task as {{ dbt.type_string() }}) as task,
        cast(status as {{ dbt.type_string() }}) as prediction_status,
        status = 'ok' as is_predicted,
        cast(label as {{ dbt.type_string() }}) as label,
        cast(score as {{ bativision.type_double() }}) as score,
        cast(value as {{ bativision.type_double() }}) as value,
        cast(probabilities as {{ dbt.type_string() }}) as probabilities_json,

        -- geometry (segmentation)
        geometry as predicted_geometry,
        {{ bativision.geometry_as_wkt('geometry') }} as predicted_geometry_wkt,

        -- timestamps
        cast(predicted_at as {{ dbt.type_timestamp() }}) as predicted_at

    from source

)

select * from renamed
