"""From config to objects: which targets a config may name (registry), their keys checked
against the builders (components), the fixed schemas (schemas), the builders (build)."""
