with

source as (

    select * from {{ source('warehouse', 'buildings') }}

),

renamed as (

    select
        -- ids
        cast(building_id as {{ dbt.type_string() }}) as building_id,
        cast(departement as {{ dbt.type_string() }}) as departement,
        cast(cell_id as {{ dbt.type_string() }}) as cell_id,

        -- geometry
        geometry,
        {{ bativision.geometry_as_wkt('geometry') }} as geometry_wkt,
        {{ bativision.geometry_centroid_lon('geometry') }} as centroid_lon,
        {{ bativision.geometry_centroid_lat('geometry') }} as centroid_lat,
        cast(geometry_status as {{ dbt.type_string() }}) as geometry_status,
        coalesce(not {{ bativision.geometry_is_empty('geometry') }}, false) as has_geometry,
        geometry_status in ('ok', 'repaired') as is_geometry_valid,

        -- attributes
        cast(area_m2 as {{ bativision.type_double() }}) as area_m2,
        cast(height_m as {{ bativision.type_double() }}) as height_m,
        cast(usage as {{ dbt.type_string() }}) as usage,
        cast(source as {{ dbt.type_string() }}) as source

    from source

)

select * from renamed
