"""moon3.pipelines."""
