"""RefCOCO / RefCOCO+ / RefCOCOg referring expression comprehension: cook from MDETR json, score acc@0.5
(docs/official_behaviour.md#refcoco)."""
