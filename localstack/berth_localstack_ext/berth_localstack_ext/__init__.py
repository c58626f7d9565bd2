"""berth's LocalStack extension: the ELBv2 API served by LocalStack's bundled moto."""
