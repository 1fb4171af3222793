"""RefCOCO / RefCOCO+ / RefCOCOg referring expression comprehension: cook from MDETR json, score acc@0.5 (spec §8.2)."""
