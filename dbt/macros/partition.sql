{#-
  A partition run (dagster-dbt passes --vars '{"departement": "<code>"}') rebuilds one
  département: the marts replace that département's rows only (incremental, delete+insert on
  DuckDB, insert_overwrite of its integer-range partition on BigQuery), and every data test
  looks at that département only, so one bad département cannot fail another's run.
  Without the var (a plain `dbt build`), everything is built and tested.
-#}

{#- The département being rebuilt, checked to be an INSEE code; none for a whole build. -#}
{% macro partition_departement() -%}
    {%- set dep = var('departement', none) -%}
    {%- if dep is not none and not modules.re.match('^(0[1-9]|1[0-9]|2[1-9AB]|[3-8][0-9]|9[0-5]|97[12346])$', dep | string) -%}
        {{ exceptions.raise_compiler_error("var('departement'): " ~ dep ~ " is not a département code") }}
    {%- endif -%}
    {{ return(dep) }}
{%- endmacro %}

{#- SQL condition selecting the partition's rows (true for a whole build). -#}
{% macro in_partition(column='departement') -%}
    {%- set dep = bativision.partition_departement() -%}
    {%- if dep is none -%} 1 = 1 {%- else -%} {{ column }} = '{{ dep }}' {%- endif -%}
{%- endmacro %}

{#- The département as an integer (2A → 201, 2B → 202): BigQuery partitions tables by integer ranges only. -#}
{% macro departement_key(column='departement') -%}
    case {{ column }} when '2A' then 201 when '2B' then 202 else cast({{ column }} as {{ dbt.type_int() }}) end
{%- endmacro %}

{#- BigQuery: the integer-range partitioning of a mart, and the partition a run overwrites. -#}
{% macro mart_partition_by() -%}
    {{ return({'field': 'departement_key', 'data_type': 'int64', 'range': {'start': 0, 'end': 1000, 'interval': 1}}) }}
{%- endmacro %}

{% macro mart_partitions() -%}
    {%- set dep = bativision.partition_departement() -%}
    {%- if dep is none -%}
        {{ return(none) }}
    {%- endif -%}
    {{ return([{'2A': 201, '2B': 202}.get(dep, dep | int) | string]) }}
{%- endmacro %}
