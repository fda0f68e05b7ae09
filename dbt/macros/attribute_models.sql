{#-
  The attribute models of var('attribute_models'), checked to be plain identifiers since
  each one becomes a column prefix (<name>_label, ...) and a join alias.
-#}
{% macro attribute_models() -%}
    {%- set names = var('attribute_models', []) -%}
    {%- if names is string -%}
        {%- set names = [names] -%}
    {%- endif -%}
    {%- for name in names -%}
        {%- if not modules.re.match('^[a-z][a-z0-9_]*$', name) -%}
            {{ exceptions.raise_compiler_error(
                "var('attribute_models'): " ~ name ~ " is not a lowercase identifier [a-z][a-z0-9_]*") }}
        {%- endif -%}
    {%- endfor -%}
    {{ return(names) }}
{%- endmacro %}

{#- SQL list literal of strings: ('a', 'b'). -#}
{% macro sql_string_list(values) -%}
    ({%- for v in values -%}'{{ v }}'{%- if not loop.last %}, {% endif -%}{%- endfor -%})
{%- endmacro %}
