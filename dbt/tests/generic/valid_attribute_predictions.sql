{#-
  Model-level test on building_attributes (it reads that model's columns): for every attribute whose columns the model has
  (declared now or kept from an earlier declaration), <name>_status is a known prediction
  status, <name>_score lies in [0, 1], status and model_version are both set or both NULL
  (NULL = the building has no prediction of that model), and, for a declared classification
  or segmentation, <name>_label is one of its classes.
  Covers attributes added later without editing any yml.
-#}
{% test valid_attribute_predictions(model, statuses=['ok', 'no_imagery', 'nodata', 'invalid_geometry', 'error']) %}

{#- `model` is the (filtered) subquery text here: the columns are read from the relation itself -#}
{%- set found = bativision.attributes_in(load_relation(ref('building_attributes'))) -%}
{%- set classes = {} -%}
{%- for spec in bativision.attribute_specs() if spec.classes -%}
    {%- do classes.update({spec.name: spec.classes}) -%}
{%- endfor -%}
{%- if found | length == 0 %}
select 1 as nothing_to_check where 1 = 0
{%- else %}
{%- for attribute in found %}
{%- set name = attribute.name %}
select
    building_id,
    '{{ name }}' as attribute_model,
    {{ name }}_status as status
from {{ model }}
where ({{ name }}_status is not null and {{ name }}_status not in {{ bativision.sql_string_list(statuses) }})
   or (({{ name }}_status is null) <> ({{ name }}_model_version is null))
{%- if attribute.task != 'regression' %}
   or ({{ name }}_score is not null and ({{ name }}_score < 0 or {{ name }}_score > 1))
{%- if name in classes %}
   or ({{ name }}_label is not null and {{ name }}_label not in {{ bativision.sql_string_list(classes[name]) }})
{%- endif %}
{%- endif %}
{%- if not loop.last %}
union all
{%- endif %}
{%- endfor %}
{%- endif %}

{% endtest %}
