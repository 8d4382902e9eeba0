"""HL7 v2: ORU^R01 results and MLLP delivery."""
