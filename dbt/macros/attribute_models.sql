{#-
  The attributes of var('attribute_models'): what the pipeline passes from the declarations
  (models/attributes.yaml), one mapping per attribute {name, task, classes?, unit?}; a plain
  name is read as a classification. Names are checked to be plain identifiers since each one
  becomes a column prefix (<name>_label, ...) and a join alias.
-#}
{% macro attribute_specs() -%}
    {%- set declared = var('attribute_models', []) -%}
    {%- if declared is string or declared is mapping -%}
        {%- set declared = [declared] -%}
    {%- endif -%}
    {%- set specs = [] -%}
    {%- for item in declared -%}
        {%- set spec = item if item is mapping else {'name': item, 'task': 'classification'} -%}
        {%- if not modules.re.match('^[a-z][a-z0-9_]*$', spec.get('name', '') | string) -%}
            {{ exceptions.raise_compiler_error(
                "var('attribute_models'): " ~ spec ~ " is not named by a lowercase identifier [a-z][a-z0-9_]*") }}
        {%- endif -%}
        {%- if spec.get('task', 'classification') not in ['classification', 'segmentation', 'regression'] -%}
            {{ exceptions.raise_compiler_error(
                "var('attribute_models'): " ~ spec.name ~ ": unknown task " ~ spec.get('task')) }}
        {%- endif -%}
        {%- do specs.append({'name': spec.name, 'task': spec.get('task', 'classification'),
                             'classes': spec.get('classes', []), 'unit': spec.get('unit')}) -%}
    {%- endfor -%}
    {{ return(specs) }}
{%- endmacro %}

{#- The declared attribute names. -#}
{% macro attribute_models() -%}
    {{ return(bativision.attribute_specs() | map(attribute='name') | list) }}
{%- endmacro %}

{#-
  The attributes whose columns `relation` already has (<name>_status and <name>_model_version;
  a regression has <name>_value): a declaration removed since keeps its columns, filled from
  the predictions still in the warehouse. Empty when the relation does not exist yet.
-#}
{% macro attributes_in(relation) -%}
    {%- set found = [] -%}
    {%- if execute and relation is not none -%}
        {%- set names = adapter.get_columns_in_relation(relation) | map(attribute='name') | map('lower') | list -%}
        {%- for col in names if col.endswith('_model_version') -%}
            {%- set name = col[:-14] -%}
            {%- if name ~ '_status' in names -%}
                {%- do found.append({'name': name, 'task': 'regression' if name ~ '_value' in names else 'classification',
                                     'classes': [], 'unit': none}) -%}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{ return(found) }}
{%- endmacro %}

{#- SQL list literal of strings: ('a', 'b'). -#}
{% macro sql_string_list(values) -%}
    ({%- for v in values -%}'{{ v }}'{%- if not loop.last %}, {% endif -%}{%- endfor -%})
{%- endmacro %}
