"""Operations assets: service scripts, deployment files and the benchmark suite (not packaged)."""
