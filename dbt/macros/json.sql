{#- A string expression rendered as a quoted, escaped JSON string literal ("gable"). -#}
{% macro json_quote(expr) -%}
    {{ return(adapter.dispatch('json_quote', 'bativision')(expr)) }}
{%- endmacro %}

{% macro default__json_quote(expr) -%}
    {{ dbt.concat(["'\"'", "replace(" ~ expr ~ ", '\"', '')", "'\"'"]) }}
{%- endmacro %}

{% macro duckdb__json_quote(expr) -%}
    cast(to_json({{ expr }}) as {{ dbt.type_string() }})
{%- endmacro %}

{% macro bigquery__json_quote(expr) -%}
    TO_JSON_STRING({{ expr }})
{%- endmacro %}
