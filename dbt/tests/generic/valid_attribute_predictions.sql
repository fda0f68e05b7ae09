{#-
  Model-level test on building_attributes: for every attribute model of
  var('attribute_models'), the <name>_status is a known prediction status, <name>_score
  lies in [0, 1], and status and model_version are both set or both NULL
  (NULL = the building has no prediction of that model).
  Covers attribute models added later without editing any yml.
-#}
{% test valid_attribute_predictions(model, statuses=['ok', 'no_imagery', 'nodata', 'invalid_geometry', 'error']) %}

{%- set names = bativision.attribute_models() -%}
{%- if names | length == 0 %}
select 1 as nothing_to_check where 1 = 0
{%- else %}
{%- for name in names %}
select
    building_id,
    '{{ name }}' as attribute_model,
    {{ name }}_status as status,
    {{ name }}_label as label,
    {{ name }}_score as score
from {{ model }}
where ({{ name }}_status is not null and {{ name }}_status not in {{ bativision.sql_string_list(statuses) }})
   or ({{ name }}_score is not null and ({{ name }}_score < 0 or {{ name }}_score > 1))
   or (({{ name }}_status is null) <> ({{ name }}_model_version is null))
{%- if not loop.last %}
union all
{%- endif %}
{%- endfor %}
{%- endif %}

{% endtest %}
