{#-
  Column test: every non-NULL value lies in [min_value, max_value] (bounds optional;
  exclusive bounds with inclusive: false). Fails with one row per offending value.
-#}
{% test accepted_range(model, column_name, min_value=none, max_value=none, inclusive=true) %}

{%- if min_value is none and max_value is none -%}
    {{ exceptions.raise_compiler_error("accepted_range needs min_value and/or max_value") }}
{%- endif -%}

select {{ column_name }} as offending_value
from {{ model }}
where {{ column_name }} is not null
  and not (
    1 = 1
    {%- if min_value is not none %}
    and {{ column_name }} {{ '>=' if inclusive else '>' }} {{ min_value }}
    {%- endif %}
    {%- if max_value is not none %}
    and {{ column_name }} {{ '<=' if inclusive else '<' }} {{ max_value }}
    {%- endif %}
  )

{% endtest %}
