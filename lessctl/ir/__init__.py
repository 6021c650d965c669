"""The reranking extension (LESS.md section 7): BEIR collections as listwise reranking instructions, evaluated."""
