{#-
  Geometry helpers, dispatched per adapter so that models stay portable.
  Geometries are WGS84 lon/lat: a DuckDB spatial GEOMETRY, a BigQuery GEOGRAPHY.
  Every macro returns NULL for a NULL geometry.
-#}

{#- WKT text of a geometry. -#}
{% macro geometry_as_wkt(geom) -%}
    {{ return(adapter.dispatch('geometry_as_wkt', 'bativision')(geom)) }}
{%- endmacro %}

{% macro default__geometry_as_wkt(geom) -%}
    ST_AsText({{ geom }})
{%- endmacro %}

{% macro bigquery__geometry_as_wkt(geom) -%}
    ST_ASTEXT({{ geom }})
{%- endmacro %}


{#- Geodesic area in square metres. -#}
{% macro geometry_area_m2(geom) -%}
    {{ return(adapter.dispatch('geometry_area_m2', 'bativision')(geom)) }}
{%- endmacro %}

{% macro default__geometry_area_m2(geom) -%}
    ST_Area({{ geom }})
{%- endmacro %}

{% macro duckdb__geometry_area_m2(geom) -%}
    {#- ST_Area_Spheroid expects lat/lon axis order: our geometries are lon/lat. -#}
    ST_Area_Spheroid(ST_FlipCoordinates({{ geom }}))
{%- endmacro %}

{% macro bigquery__geometry_area_m2(geom) -%}
    ST_AREA({{ geom }})
{%- endmacro %}


{#- True when the geometry is empty (NULL when it is NULL). -#}
{% macro geometry_is_empty(geom) -%}
    {{ return(adapter.dispatch('geometry_is_empty', 'bativision')(geom)) }}
{%- endmacro %}

{% macro default__geometry_is_empty(geom) -%}
    ST_IsEmpty({{ geom }})
{%- endmacro %}

{% macro bigquery__geometry_is_empty(geom) -%}
    ST_ISEMPTY({{ geom }})
{%- endmacro %}


{#- Longitude / latitude of the centroid (NULL for an empty geometry). -#}
{% macro geometry_centroid_lon(geom) -%}
    {{ return(adapter.dispatch('geometry_centroid_lon', 'bativision')(geom)) }}
{%- endmacro %}

{% macro default__geometry_centroid_lon(geom) -%}
    ST_X(ST_Centroid({{ geom }}))
{%- endmacro %}

{% macro bigquery__geometry_centroid_lon(geom) -%}
    SAFE.ST_X(ST_CENTROID({{ geom }}))
{%- endmacro %}

{% macro geometry_centroid_lat(geom) -%}
    {{ return(adapter.dispatch('geometry_centroid_lat', 'bativision')(geom)) }}
{%- endmacro %}

{% macro default__geometry_centroid_lat(geom) -%}
    ST_Y(ST_Centroid({{ geom }}))
{%- endmacro %}

{% macro bigquery__geometry_centroid_lat(geom) -%}
    SAFE.ST_Y(ST_CENTROID({{ geom }}))
{%- endmacro %}
