{#-
  Model-level test: `expression` (a boolean SQL expression over the model's columns) is
  true on every row. A NULL result counts as a failure. Fails with the offending rows.
-#}
{% test expression_is_true(model, expression) %}

select *
from {{ model }}
where not coalesce(({{ expression }}), false)

{% endtest %}
