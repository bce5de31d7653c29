"""The seed Lambda's logic, as a long-running boto3 poller: the reference the worker is compared
with in bench/run's backlog drain.

Written from the description of the Lambda this project replaces: for every record of every batch
(the Lambda read only the first; this one is generous and reads them all), an INSERT of a message
row queries the GSI for the conversation's group rows, then for each row deletes it and puts it
again with the message's sk and text. One request at a time, as a Lambda invocation does; 250 ms
between empty reads, Lambda's polling rate. Endpoint, region and credentials come from the usual
AWS_* variables.
"""

import time

import boto3

TABLE = "cruddur-messages"
INDEX = "message-group-sk-index"


def handle(table, record):
    if record["eventName"] != "INSERT":
        return
    keys = record["dynamodb"]["Keys"]
    pk = keys["pk"]["S"]
    if not pk.startswith("MSG#"):
        return
    group_uuid = pk[len("MSG#"):]
    sk = keys["sk"]["S"]
    message = record["dynamodb"]["NewImage"]["message"]["S"]
    rows = table.query(
        IndexName=INDEX,
        KeyConditionExpression=boto3.dynamodb.conditions.Key("message_group_uuid").eq(group_uuid),
    )["Items"]
    for row in rows:
        table.delete_item(Key={"pk": row["pk"], "sk": row["sk"]})
        row["sk"] = sk
        row["message"] = message
        table.put_item(Item=row)


def main():
    dynamodb = boto3.resource("dynamodb")
    table = dynamodb.Table(TABLE)
    streams = boto3.client("dynamodbstreams")
    arn = boto3.client("dynamodb").describe_table(TableName=TABLE)["Table"]["LatestStreamArn"]
    shard = streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"][-1]["ShardId"]
    iterator = streams.get_shard_iterator(StreamArn=arn, ShardId=shard, ShardIteratorType="TRIM_HORIZON")[
        "ShardIterator"
    ]
    while iterator:
        batch = streams.get_records(ShardIterator=iterator, Limit=1000)
        for record in batch["Records"]:
            handle(table, record)
        iterator = batch.get("NextShardIterator")
        if not batch["Records"]:
            time.sleep(0.25)


if __name__ == "__main__":
    import boto3.dynamodb.conditions  # noqa: F401  (Key)

    main()
