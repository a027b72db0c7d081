"""The teacher-logit cache (DESIGN.md §4): one class per kind (`kinds`), the store format
(`format`), the resumable writer (`writer`), the verifying reader (`reader`) and the small JSON
summary the report reads (`summary`)."""
