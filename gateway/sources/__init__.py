"""Study sources: adapters that put received studies into the spool; the pipeline does the rest."""
