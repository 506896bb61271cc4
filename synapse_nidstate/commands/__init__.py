"""The operator's commands (``synapse-nidstate migrate|verify|stats|drop``), each in
its own file, on Synapse's stores opened as a worker would (``homeserver``), with
rich progress bars and tables (``ui``)."""
